"""The talking-head engine: a portrait and a speech recording -> an MP4 of that face speaking.

``TalkingHeadEngine.run`` chains the stages and reports them to ``on_progress(stage, done, total)``:

1. ``preprocess``: face landmarks, the crop for the chosen mode, the photo's 3DMM coefficients
   (and those of the reference videos, when given);
2. ``audio2coeff``: decoding the audio, mel windows, expression and head pose per frame;
3. ``render``: the face renderer, ``batch_size`` frames at a time;
4. ``enhance``: the optional background upscaler (``background_enhancer``, a model from
   ``models/ESRGAN``, see :mod:`sadtalker.background`) then the optional face restorer, frame by
   frame (after the full modes' paste-back, as the reference);
5. ``encode``: H.264 encoding as frames arrive, then muxing the audio.

Rendering, enhancing and encoding are interleaved (frames stream from the renderer into ffmpeg), so
memory does not grow with the clip's length; ``stage_seconds`` counts each stage's own time (plus
``load`` for reading model files, 0 once they are cached). The networks are loaded on first use and
kept on the engine. The video lands in ``outputs/talking-head/`` with a JSON sidecar of the parameters,
both written atomically: a failure leaves no partial file behind.

``should_stop`` (a callable the caller flips, e.g. a job queue's interrupt flag) is asked between
stages, between render batches and before every frame is enhanced and encoded; once it answers True
the run raises :class:`TalkingHeadInterruptedError` and, like any failure, leaves no file in the outputs.
The hook is a plain callable so the engine needs nothing from whoever runs it.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.talking_head import MAX_SEED, TalkingHeadRequest
from sadtalker.errors import SadTalkerError, TalkingHeadInterruptedError
from sadtalker.motion_plan import MotionPlan, RenderOptions

if TYPE_CHECKING:
    import torch

    from pipelines.postprocess.upscalers import UpscalerCache
    from sadtalker.checkpoints import SadTalkerModels
    from sadtalker.networks.mapping import MappingNet
    from sadtalker.preprocess import FaceLandmarker

log = logging.getLogger(__name__)

OUTPUT_FOLDER = "talking-head"
STAGES = ("preprocess", "audio2coeff", "render", "enhance", "encode")

ProgressCallback = Callable[[str, int, int], None]
StopCheck = Callable[[], bool]  # True once the caller wants the job stopped
FrameEnhancer = Callable[[np.ndarray], np.ndarray]
EnhancerLoader = Callable[[str], FrameEnhancer]


@dataclass(frozen=True)
class TalkingHeadResult:
    path: Path
    sidecar: Path
    duration: float
    frames: int
    stage_seconds: dict[str, float]
    seed: int


class _StageClock:
    """Accumulates seconds per stage; stages may be entered many times (interleaved streaming)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"load": 0.0, **dict.fromkeys(STAGES, 0.0)}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


class TalkingHeadEngine:
    """Loads the SadTalker networks from ``models_dir/SadTalker`` once and renders requests with them."""

    def __init__(
        self,
        models_dir: Path,
        outputs_root: Path,
        device: str | torch.device | None = None,
        enhancer_loader: EnhancerLoader | None = None,
        background_loader: EnhancerLoader | None = None,
    ) -> None:
        """``enhancer_loader`` turns ``request.enhancer`` into a frame enhancer (the studio passes its
        face restorers); ``background_loader`` does the same for ``request.background_enhancer``
        (default: :func:`sadtalker.background.load_background_enhancer` on ``models_dir``)."""
        import torch

        self.models_dir = Path(models_dir)
        self.outputs_root = Path(outputs_root)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._enhancer_loader = enhancer_loader
        self._background_loader = background_loader
        self._upscaler_cache: UpscalerCache | None = None
        self._models: dict[int, SadTalkerModels] = {}
        self._mappings: dict[str, MappingNet] = {}
        self._landmarker: FaceLandmarker | None = None
        self._load_lock = threading.Lock()
        self._fast_generators: dict[tuple[int, str], Any] = {}

    # --- models ---------------------------------------------------------------------------------

    def models(self, size: int) -> SadTalkerModels:
        """The five networks of ``SadTalker_V0.0.2_{size}.safetensors``, or of the pre-0.0.2 set when
        that file is absent (loaded once)."""
        from sadtalker.checkpoints import load_sadtalker_models

        with self._load_lock:
            if size not in self._models:
                self._models[size] = load_sadtalker_models(self.models_dir, size).to(self.device)
            return self._models[size]

    def mapping(self, preprocess: str) -> MappingNet:
        """The mapping network for a preprocess mode (70 or 73 coefficients; loaded once)."""
        from sadtalker.checkpoints import find_sadtalker_files, load_mapping, mapping_file_name

        name = mapping_file_name(preprocess)
        with self._load_lock:
            if name not in self._mappings:
                path = find_sadtalker_files(self.models_dir).mapping(preprocess)
                self._mappings[name] = load_mapping(path).to(self.device)
            return self._mappings[name]

    def landmarker(self) -> FaceLandmarker:
        from sadtalker.preprocess import create_landmarker

        with self._load_lock:
            if self._landmarker is None:
                self._landmarker = create_landmarker(self.models_dir, device=self.device)
            return self._landmarker

    # --- the job ----------------------------------------------------------------------------------

    def _fast_generator(self, generator: Any, precision: str) -> Any:
        """The fused evaluation of the loaded face generator (``sadtalker/fast_render.py``), built once
        per generator and precision; anything else (a stand-in) is used as it is."""
        from sadtalker.fast_render import optimize_generator
        from sadtalker.networks.generator import WarpingSpadeGenerator

        if not isinstance(generator, WarpingSpadeGenerator):
            return generator
        if precision == "bf16" and not _native_bf16(generator):
            # Pre-Ampere GPUs emulate bfloat16 convolutions: the "fast" mode would be the slow one.
            log.warning("render_precision bf16: this GPU has no native bfloat16; rendering in fp32")
            precision = "fp32"
        key = (id(generator), precision)
        cached = self._fast_generators.get(key)
        if cached is None or cached[0] is not generator:
            # one fused copy at a time: each is as large as the generator (GPU memory)
            self._fast_generators.clear()
            cached = (generator, optimize_generator(generator, precision))  # type: ignore[arg-type]
            self._fast_generators[key] = cached
        return cached[1]

    def run(
        self,
        request: TalkingHeadRequest,
        on_progress: ProgressCallback | None = None,
        enhance: FrameEnhancer | None = None,
        should_stop: StopCheck | None = None,
    ) -> TalkingHeadResult:
        """Render ``request`` to ``outputs/talking-head/<stamp>-<image>-<seed>.mp4`` (+ ``.json``).

        ``enhance`` (RGB uint8 frame -> frame) overrides the engine's ``enhancer_loader`` for
        ``request.enhancer``. ``should_stop`` is polled between stages and frames: when it returns
        True the run raises :class:`TalkingHeadInterruptedError` and keeps no file. Raises
        :class:`SadTalkerError` subclasses with user-facing messages.
        """
        report = on_progress or (lambda stage, done, total: None)
        stop_point = _stop_point(should_stop)
        clock = _StageClock()
        enhancer = self._resolve_enhancer(render_options(request), enhance)  # a wrong name fails first
        plan = self._plan(request, report, stop_point, clock)
        stop_point("before render")

        def produce(sink: FinishedFrameSink) -> None:
            self._render_finished(plan, 0, plan.frame_count, sink, enhancer, clock, report, stop_point)

        return write_clip(
            self.outputs_root,
            plan,
            produce,
            audio_path=Path(request.audio),
            clock=clock,
            report=report,
            stop_point=stop_point,
            extra={"device": str(self.device)},
        )

    def plan(
        self,
        request: TalkingHeadRequest,
        on_progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> MotionPlan:
        """The per-clip stages alone (preprocess, audio2coeff): a plan any worker renders frames from."""
        report = on_progress or (lambda stage, done, total: None)
        self._resolve_enhancer(render_options(request), None, check_only=True)
        return self._plan(request, report, _stop_point(should_stop), _StageClock())

    def render_frames(
        self,
        plan: MotionPlan,
        start: int,
        end: int,
        sink: FinishedFrameSink,
        *,
        on_progress: ProgressCallback | None = None,
        enhance: FrameEnhancer | None = None,
        should_stop: StopCheck | None = None,
    ) -> dict[str, float]:
        """Finished video frames ``start..end-1`` of ``plan`` (rendered, pasted back or resized, enhanced),
        each handed to ``sink(frame, index)`` in order: exactly the frames :meth:`run` encodes there.
        Returns the seconds spent per stage."""
        report = on_progress or (lambda stage, done, total: None)
        stop_point = _stop_point(should_stop)
        clock = _StageClock()
        enhancer = self._resolve_enhancer(plan.options, enhance)
        self._render_finished(plan, start, end, sink, enhancer, clock, report, stop_point)
        return {name: round(value, 3) for name, value in clock.seconds.items() if value}

    def _plan(
        self,
        request: TalkingHeadRequest,
        report: ProgressCallback,
        stop_point: Callable[[str], None],
        clock: _StageClock,
    ) -> MotionPlan:
        from sadtalker.audio import speech_to_mel_windows
        from sadtalker.audio_io import load_audio
        from sadtalker.checkpoints import FULL_PREPROCESS_MODES
        from sadtalker.coefficients import camera_angles, driving_coefficients, predict_coefficients
        from sadtalker.preprocess import (
            load_image,
            output_frame_size,
            prepare_face,
            reference_video_coefficients,
            source_coefficients,
        )
        from sadtalker.render import HeadAngles

        seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
        full_mode = request.preprocess in FULL_PREPROCESS_MODES

        # The inputs are read before any model is loaded, so a wrong file fails at once.
        with clock.stage("audio2coeff"):
            audio = load_audio(request.audio)
        frames = audio.frame_count
        report("preprocess", 0, 1)
        with clock.stage("preprocess"):
            photo = load_image(request.image)

        stop_point("before loading the models")
        with clock.stage("load"):
            models = self.models(request.size)
            self.mapping(request.preprocess)
            landmarker = self.landmarker()
        stop_point("during preprocess")
        with clock.stage("preprocess"):
            face = prepare_face(photo, request.preprocess, request.size, landmarker)
            source = source_coefficients(models.face_3drecon, face, self.device)
            references: dict[Path, np.ndarray] = {}
            for video in dict.fromkeys(path for path in (request.ref_eyeblink, request.ref_pose) if path):
                stop_point("during preprocess")
                references[video] = reference_video_coefficients(
                    video, request.preprocess, landmarker, models.face_3drecon, self.device, max_frames=frames
                )
        report("preprocess", 1, 1)

        stop_point("during audio2coeff")
        report("audio2coeff", 0, 1)
        with clock.stage("audio2coeff"):
            predicted = predict_coefficients(
                models,
                speech_to_mel_windows(audio.samples),
                source,
                pose_style=request.pose_style,
                seed=seed,
                device=self.device,
                ref_eyeblink=references.get(request.ref_eyeblink) if request.ref_eyeblink else None,
                ref_pose=references.get(request.ref_pose) if request.ref_pose else None,
            )
            driving = driving_coefficients(
                predicted,
                source,
                full_mode=full_mode,
                expression_scale=request.expression_scale,
                still=request.still,
            )
            angles = HeadAngles(
                **{
                    name: camera_angles(values, frames)
                    for name in ("yaw", "pitch", "roll")
                    if (values := getattr(request, f"input_{name}")) is not None
                }
            )
        report("audio2coeff", 1, 1)
        return MotionPlan(
            parameters=request.model_dump(mode="json") | {"seed": seed},
            seed=seed,
            options=render_options(request),
            face_image=face.image,
            face_mode=face.mode,
            region=face.region,
            output_size=output_frame_size(face),
            coefficients=driving,
            angles=angles,
            duration=audio.duration,
            photo=photo if full_mode else None,
            details={"landmarks": landmarker.name, "checkpoints": models.source},
            stage_seconds=dict(clock.seconds),
        )

    def _render_finished(
        self,
        plan: MotionPlan,
        start: int,
        end: int,
        sink: FinishedFrameSink,
        enhancer: FrameEnhancer | None,
        clock: _StageClock,
        report: ProgressCallback,
        stop_point: Callable[[str], None],
    ) -> None:
        """Render ``[start, end)``, finish and enhance each frame, and hand it to ``sink``."""
        from sadtalker.render import FrameRenderer

        with clock.stage("load"):
            models = self.models(plan.options.size)
            mapping = self.mapping(plan.options.preprocess)
        with clock.stage("render"):
            renderer = FrameRenderer(
                kp_extractor=models.kp_extractor,
                generator=self._fast_generator(models.generator, plan.options.render_precision),
                mapping=mapping,
                source_image=plan.face_image,
                coefficients=plan.coefficients,
                device=self.device,
                angles=plan.angles,
            )
        finish = frame_finisher(plan)
        width, height = plan.output_size
        total = end - start
        done = {"render": 0, "enhance": 0}

        def batch_sink(batch: np.ndarray, first_index: int) -> None:
            clock.seconds["render"] += time.perf_counter() - batch_started[0]
            done["render"] += len(batch)
            report("render", done["render"], total)
            for offset, frame in enumerate(batch):
                stop_point(f"during render ({done['render'] - len(batch) + offset} of {total} frames done)")
                with clock.stage("render"):
                    finished = finish(frame)
                if enhancer is not None:
                    with clock.stage("enhance"):
                        finished = _enhanced(enhancer, finished, width, height)
                    done["enhance"] += 1
                sink(finished, first_index + offset)
            if enhancer is not None:
                report("enhance", done["enhance"], total)
            stop_point(f"during render ({done['render']} of {total} frames done)")
            batch_started[0] = time.perf_counter()

        batch_started = [time.perf_counter()]
        report("render", 0, total)
        renderer.render(batch_sink, start, end, batch_size=plan.options.batch_size)

    # --- helpers ----------------------------------------------------------------------------------

    def _resolve_enhancer(
        self, options: RenderOptions, enhance: FrameEnhancer | None, *, check_only: bool = False
    ) -> FrameEnhancer | None:
        """The per-frame enhancer: the background upscaler first, then the face restorer on its
        result (GFPGAN's ``bg_upsampler`` order: the restored face is pasted over the upscaled frame).
        ``check_only`` raises for an enhancer this engine cannot provide, without loading anything."""
        if check_only:
            if options.enhancer is not None and enhance is None and self._enhancer_loader is None:
                self._resolve_face_enhancer(options, None)
            return None
        face = self._resolve_face_enhancer(options, enhance)
        background = self._resolve_background_enhancer(options)
        if background is None:
            return face
        if face is None:
            return background
        return lambda frame: face(_checked_frame(background(frame), frame.shape, "background enhancer"))

    def _resolve_background_enhancer(self, options: RenderOptions) -> FrameEnhancer | None:
        name = options.background_enhancer
        if not name:
            return None
        if self._background_loader is not None:
            return self._background_loader(name)
        from pipelines.postprocess.upscalers import UpscalerCache
        from sadtalker.background import load_background_enhancer

        with self._load_lock:
            if self._upscaler_cache is None:
                self._upscaler_cache = UpscalerCache(1)  # kept, so the next job skips loading
        return load_background_enhancer(self.models_dir, name, cache=self._upscaler_cache, device=self.device)

    def _resolve_face_enhancer(
        self, options: RenderOptions, enhance: FrameEnhancer | None
    ) -> FrameEnhancer | None:
        if options.enhancer is None:
            return None
        if enhance is not None:
            return enhance
        if self._enhancer_loader is None:
            raise SadTalkerError(
                f"The face enhancer '{options.enhancer}' is not available in this build yet. "
                "Run the talking head without an enhancer (enhancer: none)."
            )
        return self._enhancer_loader(options.enhancer)


FinishedFrameSink = Callable[[np.ndarray, int], None]
"""Receives each finished video frame (RGB uint8 at the video's size) with its index in the clip."""
FrameProducer = Callable[[FinishedFrameSink], None]


def render_options(request: TalkingHeadRequest) -> RenderOptions:
    return RenderOptions(
        size=request.size,
        preprocess=request.preprocess,
        batch_size=request.batch_size,
        render_precision=request.render_precision,
        enhancer=request.enhancer,
        background_enhancer=request.background_enhancer,
    )


def frame_finisher(plan: MotionPlan) -> Callable[[np.ndarray], np.ndarray]:
    """Rendered face -> video frame: resized to the region's aspect ratio, or pasted into the photo."""
    import cv2

    from sadtalker.video import fit_frame, paste_into_photo

    width, height = plan.output_size
    if plan.face_mode in ("full", "extfull"):
        photo, region = plan.photo, plan.region
        if photo is None:
            raise ValueError("a full-mode motion plan carries its photo")
        return lambda frame: fit_frame(paste_into_photo(frame, photo, region), width, height)
    size = plan.options.size
    if (width, height) == (size, size):
        return lambda frame: frame
    return lambda frame: cv2.resize(frame, (width, height))


def output_paths(outputs_root: Path, image_name: str, seed: int) -> tuple[Path, Path]:
    """Free ``outputs/talking-head/<stamp>-<image>-<seed>.mp4`` and ``.json`` names."""
    folder = Path(outputs_root) / OUTPUT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stem_base = f"{datetime.now():%Y%m%d-%H%M%S}-{_safe_stem(Path(image_name).stem)}-{seed}"
    stem, counter = stem_base, 1
    while (folder / f"{stem}.mp4").exists() or (folder / f"{stem}.json").exists():
        counter += 1
        stem = f"{stem_base}-{counter}"
    return folder / f"{stem}.mp4", folder / f"{stem}.json"


def write_clip(
    outputs_root: Path,
    plan: MotionPlan,
    produce: FrameProducer,
    *,
    audio_path: Path,
    clock: _StageClock | None = None,
    report: ProgressCallback | None = None,
    stop_point: Callable[[str], None] | None = None,
    extra: dict[str, object] | None = None,
) -> TalkingHeadResult:
    """Encode the frames ``produce`` hands over (in order, every frame of the clip) with the speech
    into ``outputs/talking-head/``, plus the JSON sidecar; both atomically, nothing left on failure.

    The one encoder of every talking head, whether its frames came from this process's renderer or
    were joined from several workers' ranges: the same frames give the same video."""
    from pipelines.outputs.saving import atomic_write_bytes
    from sadtalker.video import H264Writer, discard, mux_audio, publish, temporary_path

    clock = clock or _StageClock()
    for name, seconds in plan.stage_seconds.items():
        clock.seconds[name] = clock.seconds.get(name, 0.0) + seconds
    report = report or (lambda stage, done, total: None)
    stop_point = stop_point or (lambda where: None)
    total = plan.frame_count
    width, height = plan.output_size
    final_video, sidecar = output_paths(outputs_root, str(plan.parameters.get("image", "image")), plan.seed)
    silent_video = temporary_path(final_video, "video.mp4")
    muxed_video = temporary_path(final_video, "muxed.mp4")
    batch_size = max(1, plan.options.batch_size)
    written = [0]
    try:
        with H264Writer(silent_video, width, height) as writer:

            def sink(frame: np.ndarray, index: int) -> None:
                if index != written[0]:
                    raise SadTalkerError(f"frame {index} arrived where frame {written[0]} was due")
                with clock.stage("encode"):
                    writer.write(frame)
                written[0] += 1
                if written[0] % batch_size == 0 or written[0] == total:
                    report("encode", written[0], total)

            produce(sink)
            if written[0] != total:
                raise SadTalkerError(f"the renderer produced {written[0]} of the clip's {total} frames")
        stop_point("before adding the audio")
        with clock.stage("encode"):
            mux_audio(silent_video, audio_path, muxed_video, plan.duration)
            discard(silent_video)
            publish(muxed_video, final_video)
        seconds = {name: round(value, 3) for name, value in clock.seconds.items()}
        record = {
            "parameters": plan.parameters,
            "video": final_video.name,
            "frames": total,
            "fps": 25,
            "duration": plan.duration,
            "stage_seconds": seconds,
            **plan.details,
            **(extra or {}),
            "output_size": [width, height],
        }
        try:
            atomic_write_bytes(sidecar, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        except BaseException:
            discard(final_video)
            raise
    except BaseException:
        discard(silent_video, muxed_video)
        raise
    report("encode", total, total)
    return TalkingHeadResult(
        path=final_video,
        sidecar=sidecar,
        duration=plan.duration,
        frames=total,
        stage_seconds=seconds,
        seed=plan.seed,
    )


def _stop_point(should_stop: StopCheck | None) -> Callable[[str], None]:
    """``stop_point(where)`` raises :class:`TalkingHeadInterruptedError` once ``should_stop()`` is True."""

    def stop_point(where: str) -> None:
        if should_stop is not None and should_stop():
            raise TalkingHeadInterruptedError(
                f"The talking head was interrupted {where}; no video was saved."
            )

    return stop_point


def _enhanced(enhancer: FrameEnhancer, frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Run the enhancer on one frame and bring its answer back to the video's size and type."""
    from sadtalker.video import fit_frame

    result = np.asarray(enhancer(frame))
    if result.ndim != 3 or result.shape[2] != 3 or result.dtype != np.uint8:
        raise SadTalkerError(
            f"The face enhancer returned a {result.dtype} array of shape {result.shape}; "
            "it must return an RGB uint8 frame."
        )
    return fit_frame(result, width, height)


def _checked_frame(frame: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``frame`` as returned by one enhancer, refused unless it is an RGB uint8 frame of ``shape``."""
    result = np.asarray(frame)
    if result.shape != tuple(shape) or result.dtype != np.uint8:
        raise SadTalkerError(
            f"The {what} returned a {result.dtype} array of shape {result.shape}; "
            f"it must return an RGB uint8 frame of shape {tuple(shape)}."
        )
    return result


def _safe_stem(stem: str) -> str:
    """The image's name reduced to characters safe in file names on every OS (at most 40)."""
    kept = "".join(character if character.isalnum() or character in "-_" else "_" for character in stem)
    return kept[:40] or "image"


def _native_bf16(module: Any) -> bool:
    """Whether ``module``'s device computes bfloat16 natively (CUDA: Ampere / RTX 30xx and newer;
    the CPU path is taken as is, it was measured faster here)."""
    import torch

    device = next(module.parameters()).device
    if device.type != "cuda":
        return True
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))
