"""Build the Stable Diffusion CLIP tokenizers offline.

Every SD family uses OpenAI's CLIP byte-pair vocabulary (49,408 tokens). Instead of fetching
``openai/clip-vit-large-patch14`` from the hub, we rebuild the vocabulary from the BPE merges
file that ships inside the ``open_clip_torch`` wheel, exactly as CLIP's reference tokenizer does.
SD1.x pads with ``<|endoftext|>``; SD2.x and SDXL's second encoder (OpenCLIP) pad with ``!``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77
_MERGE_COUNT = 49152 - 256 - 2


class TokenizerUnavailableError(RuntimeError):
    """The BPE vocabulary could not be found (``open_clip_torch`` is not installed)."""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (GPT-2's scheme)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _read_bpe_merges() -> list[str]:
    try:
        vocab_file = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
        data = vocab_file.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise TokenizerUnavailableError(
            "The CLIP vocabulary ships in the open_clip_torch package; install it with "
            "`pip install -r requirements.txt`."
        ) from exc
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1 : _MERGE_COUNT + 1]


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return CLIP's token -> id table and its merge list (cached: both are immutable)."""
    merges = tuple((left, right) for left, right in (line.split() for line in _read_bpe_merges()))
    tokens = list(_bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A ``CLIPTokenizer`` identical to the hub's SD tokenizers, built with no network.

    ``pad_token="<|endoftext|>"`` gives SD1.x's tokenizer; ``"!"`` gives SD2.x's and SDXL's
    ``tokenizer_2``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )
