"""Encode prompts the way AUTOMATIC1111 does: emphasis weights and prompts longer than 75 tokens.

CLIP sees at most 77 tokens. A1111 (``modules/sd_hijack_clip.py``) lifts that limit by cutting the
prompt into chunks of 75 tokens, wrapping each in BOS/EOS, encoding the chunks separately and
concatenating the results along the sequence axis; the UNet's cross-attention accepts any sequence
length. Emphasis multiplies each token's hidden state by its weight and then rescales the chunk so
its mean is unchanged (A1111's "Original" emphasis). The output plugs straight into diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` via ``prompt_embeds=`` and friends.

Plain prompts of up to 75 tokens produce exactly (bit for bit) what ``pipe.encode_prompt`` produces:
the same token ids, the same text-encoder call with the same batch shape, and no arithmetic on the
result. The engine's pixel-parity test depends on that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.prompts.parser import is_break_marker, parse_prompt_attention

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

CHUNK_TOKENS = 75
"""Prompt tokens per chunk; BOS and EOS make it CLIP's 77."""
MAX_CHUNKS = 32
"""At most 32 chunks (2,400 tokens): beyond that cross-attention cost grows for no visible gain."""
COMMA_BACKTRACK = 20
"""A1111's ``comma_padding_backtrack`` default: when a chunk overflows, move the words after a comma
within its last 20 tokens into the next chunk so a phrase is not cut in half."""


class PromptTooLongError(ValueError):
    """A prompt needs more than :data:`MAX_CHUNKS` chunks."""

    def __init__(self, field_name: str, token_count: int, chunk_count: int, batch_index: int | None) -> None:
        self.field_name = field_name
        self.token_count = token_count
        self.chunk_count = chunk_count
        self.batch_index = batch_index
        where = f"{field_name}" if batch_index is None else f"{field_name} (batch item {batch_index + 1})"
        super().__init__(
            f"{where} is too long: {token_count} tokens in {chunk_count} chunks of {CHUNK_TOKENS}; "
            f"the limit is {MAX_CHUNKS} chunks ({MAX_CHUNKS * CHUNK_TOKENS} tokens). "
            f"Shorten the {field_name} or use fewer BREAKs."
        )


@dataclass
class PromptEmbeddings:
    """Text conditioning for one generation batch, shaped for diffusers' pipelines.

    ``prompt_embeds`` and ``negative_prompt_embeds`` are ``(batch, 77 * chunks, features)`` with the
    same chunk count, so classifier-free guidance can batch them. The pooled tensors exist only for
    SDXL.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def as_pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the pipeline's ``__call__`` (pooled ones only when present, because
        ``StableDiffusionPipeline`` rejects them)."""
        kwargs = {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
        }
        if self.pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_prompt_embeds
        if self.negative_pooled_prompt_embeds is not None:
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


@dataclass
class PromptChunk:
    """Up to :data:`CHUNK_TOKENS` prompt token ids (no BOS/EOS/padding) and one weight per token."""

    token_ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    convert_text: Callable[[str], str] | None = None,
) -> tuple[list[PromptChunk], int]:
    """Split a prompt into weighted chunks as A1111 does; returns ``(chunks, prompt_token_count)``.

    Always at least one chunk (an empty prompt gives one empty chunk). ``convert_text`` rewrites each
    fragment before tokenizing (diffusers' multi-vector textual-inversion expansion). Also useful for a
    UI token counter.
    """
    fragments = parse_prompt_attention(prompt)
    texts = [text for text, _ in fragments]
    if convert_text is not None:
        texts = [
            text if is_break_marker(fragment) else convert_text(text)
            for text, fragment in zip(texts, fragments, strict=True)
        ]
    # verbose=False: fragments may exceed model_max_length on purpose; that is the point of chunking.
    token_lists = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    comma_id = tokenizer.get_vocab().get(",</w>")

    chunks: list[PromptChunk] = []
    current = PromptChunk()
    last_comma = -1  # index in `current` of the latest comma, -1 when none
    token_count = 0

    def close_chunk() -> None:
        nonlocal current, last_comma
        chunks.append(current)
        current = PromptChunk()
        last_comma = -1

    for fragment, token_ids in zip(fragments, token_lists, strict=True):
        if is_break_marker(fragment):
            close_chunk()
            continue
        weight = fragment[1]
        token_count += len(token_ids)
        for token_id in token_ids:
            chunk_full = len(current.token_ids) == CHUNK_TOKENS
            if token_id == comma_id:
                last_comma = len(current.token_ids)
            elif chunk_full and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # Overflow right after a comma-separated phrase started: move that phrase along.
                cut = last_comma + 1
                moved = PromptChunk(current.token_ids[cut:], current.weights[cut:])
                del current.token_ids[cut:], current.weights[cut:]
                close_chunk()
                current = moved
            if len(current.token_ids) == CHUNK_TOKENS:
                close_chunk()
            current.token_ids.append(token_id)
            current.weights.append(weight)

    if current.token_ids or not chunks:
        chunks.append(current)
    return chunks, token_count


def encode_prompts(
    pipe: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    clip_skip: int = 1,
) -> PromptEmbeddings:
    """Encode a batch of prompts and their negatives with A1111 emphasis and chunking.

    ``pipe`` is a diffusers SD1.x/SD2.x pipeline (``tokenizer``, ``text_encoder``) or an SDXL pipeline
    (also ``tokenizer_2``, ``text_encoder_2``). ``clip_skip`` counts as in A1111: 1 is the last layer.
    For SD1.x/SD2.x, ``clip_skip=N`` takes the N-th hidden state from the end and applies the final
    layer norm. SDXL already uses the penultimate layer (without the norm) for ``clip_skip=1``, as
    diffusers does, and goes one layer further back per step; its pooled embedding comes from
    ``text_encoder_2`` on the first chunk.

    Raises :class:`PromptTooLongError` for a prompt over :data:`MAX_CHUNKS` chunks, and ``ValueError``
    for mismatched batch sizes or an out-of-range ``clip_skip``.
    """
    import torch

    if not prompts:
        raise ValueError("prompt: at least one prompt is needed.")
    if len(negative_prompts) != len(prompts):
        raise ValueError(
            f"negative_prompt: got {len(negative_prompts)} negative prompts for {len(prompts)} prompts; "
            "give one negative prompt per prompt (an empty string for none)."
        )
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be 1 or more (1 = last CLIP layer), got {clip_skip}.")

    encoders = _text_encoders(pipe)
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    convert = getattr(pipe, "maybe_convert_prompt", None)

    # chunked[field][encoder][prompt] -> list of chunks
    fields = {"prompt": list(prompts), "negative_prompt": list(negative_prompts)}
    chunked: dict[str, list[list[list[PromptChunk]]]] = {}
    for field_name, texts in fields.items():
        per_encoder = []
        for tokenizer, _ in encoders:
            convert_text = None if convert is None else _bind_converter(convert, tokenizer)
            per_prompt = []
            for index, text in enumerate(texts):
                chunks, token_count = chunk_prompt(tokenizer, text, convert_text)
                if len(chunks) > MAX_CHUNKS:
                    batch_index = index if len(texts) > 1 else None
                    raise PromptTooLongError(field_name, token_count, len(chunks), batch_index)
                per_prompt.append(chunks)
            per_encoder.append(per_prompt)
        chunked[field_name] = per_encoder

    # One chunk count for everything: prompts in a batch must stack, and CFG batches positive with
    # negative. Shorter prompts get empty chunks (BOS, EOS, padding), as A1111 pads with its empty prompt.
    chunk_count = max(
        len(chunks) for per_encoder in chunked.values() for per_prompt in per_encoder for chunks in per_prompt
    )

    results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with torch.no_grad():
        for field_name, per_encoder in chunked.items():
            hidden_parts: list[torch.Tensor] = []
            pooled: torch.Tensor | None = None
            for (tokenizer, text_encoder), per_prompt in zip(encoders, per_encoder, strict=True):
                padded = [chunks + [PromptChunk()] * (chunk_count - len(chunks)) for chunks in per_prompt]
                hidden, encoder_pooled = _encode_chunked(tokenizer, text_encoder, padded, clip_skip, is_sdxl)
                hidden_parts.append(hidden)
                if encoder_pooled is not None:
                    pooled = encoder_pooled
            # Like diffusers: the last encoder decides device and dtype of the result.
            target = hidden_parts[-1]
            hidden = torch.cat(
                [part.to(device=target.device, dtype=target.dtype) for part in hidden_parts], dim=-1
            )
            results[field_name] = (hidden, pooled)

    prompt_embeds, pooled_prompt_embeds = results["prompt"]
    negative_prompt_embeds, negative_pooled_prompt_embeds = results["negative_prompt"]
    return PromptEmbeddings(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds if is_sdxl else None,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds if is_sdxl else None,
    )


def _text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """The (tokenizer, text_encoder) pairs of a pipeline, in diffusers' concatenation order.

    SDXL refiners have only the second pair; the pooled output comes from the last pair.
    """
    pairs = []
    for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer = getattr(pipe, tokenizer_name, None)
        text_encoder = getattr(pipe, encoder_name, None)
        if tokenizer is not None and text_encoder is not None:
            pairs.append((tokenizer, text_encoder))
    if not pairs:
        raise ValueError(
            f"{type(pipe).__name__} has no tokenizer/text_encoder pair; prompts can only be encoded for "
            "Stable Diffusion 1.x, 2.x and SDXL pipelines."
        )
    return pairs


def _bind_converter(convert: Callable[[str, Any], str], tokenizer: Any) -> Callable[[str], str]:
    def convert_text(text: str) -> str:
        return convert(text, tokenizer)

    return convert_text


def _encode_chunked(
    tokenizer: Any,
    text_encoder: Any,
    chunks_per_prompt: list[list[PromptChunk]],
    clip_skip: int,
    is_sdxl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode equally long chunk lists with one encoder: ``(batch, 77 * chunks, C)`` and, when the
    encoder has a projection (SDXL's second), the pooled embedding of the first chunk."""
    import torch
    from diffusers.utils.torch_utils import get_module_execution_device

    device = get_module_execution_device(text_encoder)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    layer_count = text_encoder.config.num_hidden_layers
    max_skip = layer_count if not is_sdxl else layer_count - 1
    if clip_skip > max_skip:
        raise ValueError(
            f"clip_skip={clip_skip} is more than this text encoder allows ({max_skip}); "
            "use a smaller clip_skip."
        )

    outputs: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for chunk_index in range(len(chunks_per_prompt[0])):
        batch = [chunks[chunk_index] for chunks in chunks_per_prompt]
        ids = torch.tensor(
            [_chunk_ids(chunk, bos, eos, pad) for chunk in batch], dtype=torch.long, device=device
        )
        mask = None
        if use_mask:
            mask = torch.tensor(
                [
                    [1] * (len(chunk.token_ids) + 2) + [0] * (CHUNK_TOKENS - len(chunk.token_ids))
                    for chunk in batch
                ],
                dtype=torch.long,
                device=device,
            )
        if is_sdxl:
            output = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
            hidden = output.hidden_states[-(clip_skip + 1)]
            text_embeds = getattr(output, "text_embeds", None)
            if chunk_index == 0 and text_embeds is not None:
                pooled = text_embeds
        elif clip_skip == 1:
            hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
        else:
            output = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
            # transformers 5 flattened CLIPTextModel (no `.text_model`); *WithProjection still nests it.
            final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
            hidden = final_layer_norm(output.hidden_states[-clip_skip])
        weights = [[1.0, *chunk.weights] + [1.0] * (CHUNK_TOKENS + 1 - len(chunk.weights)) for chunk in batch]
        outputs.append(_apply_emphasis(hidden, weights))
    return torch.cat(outputs, dim=1), pooled


def _chunk_ids(chunk: PromptChunk, bos: int, eos: int, pad: int) -> list[int]:
    """BOS, tokens, EOS, then padding to 77 — the layout diffusers' tokenizer call produces."""
    return [bos, *chunk.token_ids, eos] + [pad] * (CHUNK_TOKENS - len(chunk.token_ids))


def _apply_emphasis(hidden: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A1111 "Original" emphasis: scale each token's vector by its weight, then restore the mean.

    The mean is taken per prompt (A1111 encodes one prompt per call). Rows whose weights are all 1.0
    are returned untouched, so plain prompts keep bit parity with diffusers. The arithmetic runs in
    float32 so half-precision encoders do not lose the mean.
    """
    import torch

    multipliers = torch.tensor(weights, dtype=torch.float32, device=hidden.device)
    weighted_rows = (multipliers != 1.0).any(dim=1)
    if not bool(weighted_rows.any()):
        return hidden
    original = hidden.float()
    original_mean = original.mean(dim=(1, 2), keepdim=True)
    weighted = original * multipliers.unsqueeze(-1)
    rescaled = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted_rows[:, None, None], rescaled.to(hidden.dtype), hidden)
