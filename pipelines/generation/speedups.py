"""Per-job speed options on top of stock diffusers pipelines: step caching, token merging, fast decode.

All three attach to the loaded UNet (or replace the final decode) for one job and are taken off
when the job ends, so a job without them runs exactly the plain diffusers computation.

* **Step caching** (the DeepCache method, Ma et al. 2023): the UNet's deep features change little
  between neighbouring denoising steps. Every ``interval``-th UNet call runs in full and keeps the
  outputs of the deep blocks (every down block but the first, the mid block and every up block but
  the last); the calls in between run only the shallow path (``conv_in``, the first down block, the
  last up block, ``conv_out``) and take the deep features from that cache. It is done with diffusers'
  own hook registry on those blocks (``ModelHook.new_forward``), so the UNet's forward, ControlNet
  residuals and every pipeline stay stock. The cache is dropped when a new denoising run starts
  (a new scheduler, a higher timestep than the last call, or another latent shape).
* **Token merging** (the ToMe-for-SD method, Bolya & Hoffman 2023): in the self-attention of the
  highest-resolution transformer blocks, similar tokens are merged before attention and copied back
  after it. Our attention processor wraps whichever processor is installed (SDPA, xFormers, sliced),
  so it composes with the attention backend; ``ratio`` is the share of tokens removed.
* **Fast decode**: the final VAE decode done by TAESD (``AutoencoderTiny``) from
  ``models/VAE-approx``, for drafts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

STEP_CACHE_HOOK = "sd_studio_step_cache"
# diffusers' name for the hook by which group offloading with CUDA streams traces the block order
# (``diffusers.hooks.group_offloading._LAZY_PREFETCH_GROUP_OFFLOADING``, private there).
OFFLOAD_TRACE_HOOK = "lazy_prefetch_group_offloading"


@dataclass(frozen=True)
class SpeedOptions:
    """The per-job options, resolved (request field, else ``override_settings``, else studio default)."""

    cache_interval: int = 1
    token_merging_ratio: float = 0.0
    fast_decode: bool = False

    @property
    def any(self) -> bool:
        return self.cache_interval > 1 or self.token_merging_ratio > 0 or self.fast_decode


@dataclass
class SpeedStats:
    """What the options did in a job (tests and benchmarks read it; notes are built from it)."""

    unet_calls: int = 0
    full_calls: int = 0
    cached_calls: int = 0
    merged_attention_calls: int = 0
    tokens_removed: int = 0
    runs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _first_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    import torch

    value = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _sample_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    sample = kwargs.get("sample", args[0] if args else None)
    return (tuple(sample.shape), sample.dtype, sample.device) if sample is not None else ()


class _StepCacheRoot:
    """Decides, per UNet call, whether the deep blocks run or are read from the cache."""

    def __init__(self, interval: int, stats: SpeedStats) -> None:
        self.interval = interval
        self.stats = stats
        self.outputs: dict[int, Any] = {}
        self.use_cache = False
        self._since_full = 0
        self._last_timestep: float | None = None
        self._key: tuple[Any, ...] = ()

    def reset(self) -> None:
        self.outputs.clear()
        self.use_cache = False
        self._since_full = 0
        self._last_timestep = None
        self._key = ()

    def before_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = _first_timestep(args, kwargs)
        key = _sample_key(args, kwargs)
        new_run = (
            key != self._key
            or self._last_timestep is None
            or (timestep is not None and timestep > self._last_timestep)
        )
        if new_run:
            self.reset()
            self.stats.runs += 1
        self._key = key
        self._last_timestep = timestep
        self.stats.unet_calls += 1
        self.use_cache = bool(self.outputs) and 0 < self._since_full < self.interval
        if self.use_cache:
            self._since_full += 1
            self.stats.cached_calls += 1
        else:
            self.outputs.clear()
            self._since_full = 1
            self.stats.full_calls += 1


def _make_block_hook() -> type:
    from diffusers.hooks import ModelHook

    class DeepBlockHook(ModelHook):
        """Runs the block on full calls (keeping its output), returns the kept output otherwise."""

        def __init__(self, root: _StepCacheRoot, index: int) -> None:
            super().__init__()
            self.root = root
            self.index = index

        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            if self.root.use_cache and self.index in self.root.outputs:
                return self.root.outputs[self.index]
            output = self.fn_ref.original_forward(*args, **kwargs)
            self.root.outputs[self.index] = output
            return output

    return DeepBlockHook


def deep_blocks(unet: Any) -> list[Any]:
    """The blocks whose outputs step caching reuses: down blocks after the first, the mid block,
    up blocks before the last."""
    blocks = list(unet.down_blocks)[1:]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(unet.mid_block)
    blocks.extend(list(unet.up_blocks)[:-1])
    return blocks


@contextmanager
def step_caching(unet: Any, interval: int, stats: SpeedStats) -> Iterator[_StepCacheRoot | None]:
    """Cache the UNet's deep features for ``interval - 1`` calls out of ``interval`` (1: off)."""
    if interval <= 1 or len(unet.down_blocks) < 2:
        yield None
        return
    from diffusers.hooks import HookRegistry

    block_hook_cls = _make_block_hook()
    root = _StepCacheRoot(interval, stats)
    registries = []
    blocks = deep_blocks(unet)
    keepers: list[Any] = []

    def hook_blocks() -> None:
        for handle in keepers:
            handle.remove()
        keepers.clear()
        for index, block in enumerate(blocks):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            registry.register_hook(block_hook_cls(root, index), STEP_CACHE_HOOK)
            registries.append((registry, STEP_CACHE_HOOK))

    pending: list[Callable[[], None]] = []
    if offload_trace_pending(unet):
        # The first call runs every block anyway: plain torch hooks keep its deep outputs, and the
        # skipping hooks go on once diffusers' tracer hooks have left the blocks.
        for index, block in enumerate(blocks):
            keepers.append(block.register_forward_hook(_keep_output(root, index)))
        pending.append(hook_blocks)
    else:
        hook_blocks()

    def before(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        root.before_call(args, kwargs)

    def after(module: Any, args: Any, output: Any) -> None:
        if pending and not offload_trace_pending(module):
            pending.pop()()

    # The UNet-level hooks are torch module hooks, not diffusers' HookRegistry: accelerate's model
    # offload (``medvram``) swaps ``unet.forward`` in and out around every pipeline call, which
    # would drop a registry hook (or restore a stale forward when it is taken off).
    handles = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after),
    ]
    try:
        yield root
    finally:
        for handle in [*keepers, *handles]:
            handle.remove()
        for registry, name in registries:
            registry.remove_hook(name, recurse=False)
        root.reset()


def offload_trace_pending(unet: Any) -> bool:
    """Whether diffusers' group offloading (with CUDA streams, the ``lowvram`` preset) has yet to
    trace the order of the UNet's blocks on its first forward.

    Its tracer hooks sit on the blocks until that forward ends and then remove themselves; diffusers'
    ``HookRegistry.remove_hook`` does not rewire a later hook that has ``new_forward`` (our skipping
    hook), so the blocks would keep running on cached steps and the tracer keep recording for the
    rest of the process. Step caching therefore hooks the blocks only after the trace.
    """
    registry = getattr(unet, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(OFFLOAD_TRACE_HOOK) is not None


def _keep_output(root: _StepCacheRoot, index: int) -> Callable[..., None]:
    def keep(module: Any, args: Any, output: Any) -> None:
        root.outputs[index] = output

    return keep


# token merging -----------------------------------------------------------------------------------
class _TokenMergeState:
    """The latent size of the current UNet call and the seeded choice of merge targets."""

    def __init__(self, ratio: float, stats: SpeedStats, seed: int = 0) -> None:
        import torch

        self.ratio = ratio
        self.stats = stats
        self.seed = seed
        self.latent_size: tuple[int, int] | None = None
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def grid_for(self, tokens: int) -> tuple[int, int] | None:
        """The token grid ``(h, w)`` of a feature map with ``tokens`` tokens in this call."""
        if self.latent_size is None:
            return None
        height, width = self.latent_size
        factor = round(math.sqrt(height * width / tokens)) or 1
        grid = (math.ceil(height / factor), math.ceil(width / factor))
        return grid if grid[0] * grid[1] == tokens else None


def _merge_plan(x: torch.Tensor, grid: tuple[int, int], remove: int, generator: torch.Generator) -> Any:
    """Bipartite matching on ``x`` ``(B, N, C)``: one target token per 2x2 cell (a seeded random
    corner), every other token a candidate; the ``remove`` candidates most similar (cosine) to
    their best target are averaged into it. Returns ``merge`` and ``unmerge`` functions."""
    import torch

    batch, count, _ = x.shape
    height, width = grid
    cells_y, cells_x = height // 2, width // 2
    corner = torch.randint(4, (cells_y, cells_x), generator=generator)
    rows = torch.arange(cells_y).view(-1, 1) * 2 + corner // 2
    cols = torch.arange(cells_x).view(1, -1) * 2 + corner % 2
    target_index = (rows * width + cols).flatten().to(x.device)
    is_target = torch.zeros(count, dtype=torch.bool, device=x.device)
    is_target[target_index] = True
    source_index = (~is_target).nonzero().flatten()
    remove = min(remove, int(source_index.numel()))

    sources, targets = x[:, source_index], x[:, target_index]
    similarity = torch.nn.functional.normalize(sources.float(), dim=-1) @ torch.nn.functional.normalize(
        targets.float(), dim=-1
    ).transpose(1, 2)
    best_score, best_target = similarity.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    moved, kept = order[:, :remove], order[:, remove:]
    moved_to = best_target.gather(1, moved)

    def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))

    def merge(values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[-1]
        source_values, target_values = values[:, source_index], values[:, target_index]
        merged = target_values.scatter_reduce(
            1,
            moved_to.unsqueeze(-1).expand(-1, -1, channels),
            take(source_values, moved),
            reduce="mean",
            include_self=True,
        )
        return torch.cat([take(source_values, kept), merged], dim=1)

    def unmerge(values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[-1]
        kept_count = kept.shape[1]
        kept_values, target_values = values[:, :kept_count], values[:, kept_count:]
        source_values = values.new_empty(batch, source_index.numel(), channels)
        source_values.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, channels), kept_values)
        source_values.scatter_(1, moved.unsqueeze(-1).expand(-1, -1, channels), take(target_values, moved_to))
        out = values.new_empty(batch, count, channels)
        out[:, source_index] = source_values
        out[:, target_index] = target_values
        return out

    return merge, unmerge, remove


class TokenMergingProcessor:
    """Wraps an attention processor: self-attention runs on merged tokens, outputs are unmerged."""

    def __init__(self, inner: Any, state: _TokenMergeState) -> None:
        self.inner = inner
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        grid = self.state.grid_for(hidden_states.shape[1]) if hidden_states.ndim == 3 else None
        remove = int(hidden_states.shape[1] * self.state.ratio) if grid else 0
        if encoder_hidden_states is not None or attention_mask is not None or grid is None or remove <= 0:
            return self._call_inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        merge, unmerge, removed = _merge_plan(hidden_states, grid, remove, self.state.generator)
        self.state.stats.merged_attention_calls += 1
        self.state.stats.tokens_removed += removed
        output = self._call_inner(attn, merge(hidden_states), None, None, temb, kwargs)
        return unmerge(output)

    def _call_inner(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """By keyword, and ``temb`` only when given: the sliced processors (``lowvram``) take no
        ``temb`` at all."""
        if temb is not None:
            kwargs = {**kwargs, "temb": temb}
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )


def merged_attention_layers(unet: Any) -> list[Any]:
    """Self-attention (``attn1``) layers of the transformer blocks at the highest resolution that
    has attention (SD1/SD2: the first level; SDXL: the second, its first has none)."""
    from diffusers.models.attention import BasicTransformerBlock

    types = list(unet.config.down_block_types)
    first = next((i for i, name in enumerate(types) if "CrossAttn" in name), None)
    if first is None:
        return []
    levels = len(types)
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = levels - 1 - int(parts[1])
        else:
            continue
        if level == first:
            layers.append(module.attn1)
    return layers


@contextmanager
def token_merging(unet: Any, ratio: float, stats: SpeedStats) -> Iterator[_TokenMergeState | None]:
    """Merge ``ratio`` of the tokens in the highest-resolution self-attention layers (0: off)."""
    if ratio <= 0:
        yield None
        return
    state = _TokenMergeState(ratio, stats)

    def latent_size(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        state.latent_size = tuple(sample.shape[-2:]) if sample is not None else None

    handle = unet.register_forward_pre_hook(latent_size, with_kwargs=True)  # see step_caching
    originals = [(layer, layer.processor) for layer in merged_attention_layers(unet)]
    for layer, processor in originals:
        layer.set_processor(TokenMergingProcessor(processor, state))
    try:
        yield state
    finally:
        for layer, processor in originals:
            layer.set_processor(processor)
        handle.remove()


# the job-level frame ---------------------------------------------------------------------------
class JobSpeedups:
    """The options of one job attached to one UNet; ``new_run()`` drops the step cache."""

    def __init__(self, options: SpeedOptions) -> None:
        self.options = options
        self.stats = SpeedStats()
        self.extra_infotext: dict[str, object] = {}
        self.extra_notes: list[str] = []
        self._roots: list[Any] = []
        self._merges: list[Any] = []
        self._stacks: dict[int, ExitStack] = {}

    def new_run(self) -> None:
        for root in self._roots:
            if root is not None:
                root.reset()
        for state in self._merges:
            if state is not None:
                state.reset()

    @contextmanager
    def attached(self, unet: Any) -> Iterator[JobSpeedups]:
        self._attach(unet)
        try:
            yield self
        finally:
            stack = self._stacks.pop(id(unet), None)
            if stack is not None:
                stack.close()

    @contextmanager
    def detached(self, unet: Any) -> Iterator[None]:
        """Off while memory options are (re)applied inside a job (the first batch, an OOM retry):
        the attention processors and offload hooks they install must be the ones the options wrap."""
        stack = self._stacks.pop(id(unet), None)
        if stack is None:
            yield
            return
        stack.close()
        try:
            yield
        finally:
            self._attach(unet)

    def _attach(self, unet: Any) -> None:
        stack = ExitStack()
        root = stack.enter_context(step_caching(unet, self.options.cache_interval, self.stats))
        merge = stack.enter_context(token_merging(unet, self.options.token_merging_ratio, self.stats))
        self._roots.append(root)
        self._merges.append(merge)
        stack.callback(self._roots.remove, root)
        stack.callback(self._merges.remove, merge)
        self._stacks[id(unet)] = stack

    def notes(self) -> list[str]:
        """What the options did, for the job's notes."""
        lines = list(self.extra_notes)
        stats = self.stats
        if self.options.cache_interval > 1:
            lines.append(
                f"step caching: {stats.cached_calls} of {stats.unet_calls} UNet calls reused the cached "
                f"deep features (interval {self.options.cache_interval})"
            )
        if self.options.token_merging_ratio > 0:
            lines.append(
                f"token merging: {stats.tokens_removed} tokens merged away in "
                f"{stats.merged_attention_calls} self-attention calls "
                f"(ratio {self.options.token_merging_ratio})"
            )
        return lines

    def infotext(self) -> dict[str, object]:
        """A1111-style keys for what was applied (``Token merging ratio`` is A1111's own key)."""
        params: dict[str, object] = dict(self.extra_infotext)
        if self.options.cache_interval > 1:
            params["Cache interval"] = self.options.cache_interval
        if self.options.token_merging_ratio > 0:
            params["Token merging ratio"] = self.options.token_merging_ratio
        return params


def decode_with_taesd(pipe: Any, decoder: Any, latents: torch.Tensor) -> list[Image.Image]:
    """The final decode by TAESD: it takes the sampler's (scaled) latents directly."""
    import torch

    device = latents.device
    with torch.inference_mode():
        decoder.to(device=device, dtype=torch.float32)
        image = decoder.decode(latents.float()).sample.clamp(-1, 1)
    return pipe.image_processor.postprocess(image, output_type="pil")
