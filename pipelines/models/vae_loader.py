"""External VAEs from ``models/VAE`` (A1111's "SD VAE" setting), swapped in per job.

A VAE file is a single ``.safetensors`` in the original layout (keys with or without the
``first_stage_model.`` prefix, as A1111 users have them) or a diffusers ``AutoencoderKL`` folder.
It must fit the checkpoint's VAE architecture, so its config is the loaded checkpoint's own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipelines.errors import CheckpointLoadError
from pipelines.models.registry import ModelEntry
from pipelines.models.weight_files import read_state_dict

AUTOMATIC = ("Automatic", "None", "")


class VaeCache:
    """A few loaded VAEs, keyed by file and the architecture they were built for."""

    def __init__(self, max_loaded: int = 2) -> None:
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, float, str], Any] = OrderedDict()

    def get(self, entry: ModelEntry, reference_vae: Any) -> Any:
        key = (str(entry.path), entry.mtime, repr(sorted(dict(reference_vae.config).items())))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        vae = load_vae(entry, reference_vae)
        with self._lock:
            self._cache[key] = vae
            while len(self._cache) > self.max_loaded:
                self._cache.popitem(last=False)
        return vae


def load_vae(entry: ModelEntry, reference_vae: Any) -> Any:
    """Build an ``AutoencoderKL`` like ``reference_vae`` with the weights of ``entry``."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    dtype = reference_vae.dtype
    if entry.file_format == "diffusers" or entry.path.is_dir():
        try:
            return AutoencoderKL.from_pretrained(str(entry.path), local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise CheckpointLoadError(f"VAE {entry.filename}: cannot load this folder ({exc}).") from exc
    state_dict = read_state_dict(entry.path)
    config = dict(reference_vae.config)
    converted = convert_ldm_vae_checkpoint(state_dict, config)
    if not converted:
        # Already in diffusers' key layout (a diffusers VAE saved as one file).
        converted = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    expected = vae.state_dict()
    missing = [k for k in expected if k not in converted]
    wrong = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise CheckpointLoadError(
            f"VAE {entry.filename} does not fit this checkpoint's VAE "
            f"({len(missing)} missing and {len(wrong)} mismatched tensors, e.g. {(missing + wrong)[:2]}). "
            "Pick a VAE made for this model family, or Automatic."
        )
    vae.load_state_dict({k: converted[k].to(dtype) for k in expected}, strict=True, assign=True)
    vae.to(device=reference_vae.device, dtype=dtype).eval()
    return vae


@contextmanager
def vae_swapped(loaded: Any, vae: Any) -> Iterator[None]:
    """Use ``vae`` in a loaded checkpoint's pipelines for one job, then put its own VAE back
    (also in task pipelines created during the job, which copy the base pipeline's VAE)."""
    original = loaded.pipe.vae
    try:
        for pipe in (loaded.pipe, *loaded.derived.values()):
            pipe.vae = vae
        yield
    finally:
        for pipe in (loaded.pipe, *loaded.derived.values()):
            pipe.vae = original
