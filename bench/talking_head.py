"""Talking-head cost per second of video, per stage, and peak memory for a short and a long clip.

No download: the official SadTalker files are written with seeded random weights (same layout and
cost as the real ones) into a temporary ``models/SadTalker/``, unless ``--models-dir`` points at a
folder that already has them. Each clip runs in its own process (so ``ru_maxrss`` is that clip's
peak) rendering ``skimage.data.astronaut()`` at 256 pixels, ``crop`` mode, with a synthetic
speech-like signal of the requested length. Printed per clip: seconds of compute per second of
video for each stage and in total, the peak RSS, and finally the ratio of the two peaks (about 1.0
when memory does not grow with the clip's length).

``--generator stand-in`` swaps the face generator for a trivial one, to measure the rest of the
pipeline (and its memory) in seconds: the real generator costs 10-40 s per 256-pixel frame on a
small CPU, i.e. hours for a 60 s clip.

    .venv/bin/python bench/talking_head.py [--clips 10 60] [--generator real|stand-in] [--batch-size 2]

``--compare-renderer`` instead times the face generator alone on one input batch, interleaved, best
of ``--runs``: the reference's order (``generator(source, driving_kp, source_kp)`` per batch of
frames, as its ``make_animation`` loop does) against ours (``sadtalker/fast_render.py``: fused
layers, the source volume cached across the clip) in fp32 and in the bf16 "fast" mode; it prints
the per-frame times, the ratios and each mode's largest difference from the reference frames.

    .venv/bin/python bench/talking_head.py --compare-renderer [--size 256] [--batch-size 2] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("load", "preprocess", "audio2coeff", "render", "enhance", "encode")


def write_random_models(models_dir: Path) -> None:
    """Random-weight copies of ``SadTalker_V0.0.2_256.safetensors`` and the two mapping files."""
    import torch
    from safetensors.torch import save_file

    from sadtalker.checkpoints import MAPPING_CROP_FILE, MAPPING_FULL_FILE, checkpoint_file_name
    from sadtalker.networks.factory import SUB_MODEL_PREFIXES, build_mapping, build_sub_model

    folder = models_dir / "SadTalker"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {
        f"{prefix}.{key}": value.contiguous()
        for prefix in SUB_MODEL_PREFIXES
        for key, value in build_sub_model(prefix).state_dict().items()
    }
    save_file(state, str(folder / checkpoint_file_name(256)))
    for name, coefficients in ((MAPPING_CROP_FILE, 70), (MAPPING_FULL_FILE, 73)):
        torch.save({"mapping": build_mapping(coefficients).state_dict()}, folder / name)


def write_speech_like(path: Path, seconds: float, rate: int = 16000) -> None:
    """Harmonics of a wandering pitch, amplitude-modulated at a syllable rate (about 4 Hz)."""
    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    signal = 0.2 * voice * envelope
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())


class StandInGenerator:
    """The source image, brightened by the keypoints' mean motion: the generator's interface, no cost."""

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        return source_image

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        motion = (driving_kp - source_kp).mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return {"prediction": (source_volume + motion).clamp(0, 1)}


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def run_child(args: argparse.Namespace) -> None:
    """One clip in this process; prints a JSON line."""
    import cv2
    from skimage import data

    from contract.talking_head import TalkingHeadRequest
    from sadtalker.engine import TalkingHeadEngine

    work = Path(args.work_dir)
    image = work / "astronaut.png"
    cv2.imwrite(str(image), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    audio = work / f"speech_{args.seconds:g}s.wav"
    write_speech_like(audio, args.seconds)
    engine = TalkingHeadEngine(Path(args.models_dir), work / "outputs", device=args.device)
    if args.generator == "stand-in":
        engine.models(256).generator = StandInGenerator()
    started = time.perf_counter()
    result = engine.run(
        TalkingHeadRequest(image=image, audio=audio, size=256, batch_size=args.batch_size, seed=0)
    )
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": args.seconds,
                "frames": result.frames,
                "duration": result.duration,
                "stage_seconds": result.stage_seconds,
                "wall": wall,
                "peak_rss": peak_rss_bytes(),
            }
        )
    )


def compare_renderer(args: argparse.Namespace) -> dict[str, float]:
    """Reference generator forward vs our fused renderer on the same random-weight generator."""
    import torch

    from sadtalker.fast_render import optimize_generator
    from sadtalker.networks.factory import build_sub_model

    torch.manual_seed(0)
    generator = build_sub_model("generator").eval().to(args.device)
    batch = args.batch_size
    source_image = torch.rand(1, 3, args.size, args.size, device=args.device)
    source_kp = torch.rand(1, 15, 3, device=args.device) * 2 - 1
    driving_kp = source_kp + 0.05 * torch.randn(batch, 15, 3, device=args.device)
    source_kp = source_kp.expand(batch, -1, -1)
    fused = {"fp32": optimize_generator(generator, "fp32"), "bf16": optimize_generator(generator, "bf16")}
    volumes = {name: model.encode_source(source_image) for name, model in fused.items()}

    def reference() -> torch.Tensor:
        return generator(source_image.expand(batch, -1, -1, -1), driving_kp, source_kp)["prediction"]

    def ours(name: str) -> torch.Tensor:
        volume = volumes[name].expand(batch, *volumes[name].shape[1:])
        return fused[name].render(volume, driving_kp, source_kp)["prediction"]

    variants = {
        "reference": reference,
        "ours fp32": lambda: ours("fp32"),
        "ours bf16 (fast)": lambda: ours("bf16"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(args.runs):
            for name, run in variants.items():
                started = time.perf_counter()
                outputs[name] = run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - started) / batch)
    best_reference = min(times["reference"])
    print(
        f"face generator, {args.size} px, batch {batch}, {args.device} "
        f"(torch threads {torch.get_num_threads()}), best of {args.runs} interleaved runs:"
    )
    ratios = {}
    for name, values in times.items():
        difference = (outputs[name] - outputs["reference"]).abs().max().item()
        ratios[name] = min(values) / best_reference
        print(
            f"  {name:>18}: {min(values):7.2f} s/frame (runs {', '.join(f'{v:.2f}' for v in values)}); "
            f"time vs reference {ratios[name]:.3f}x; max |frame - reference| {difference:.2e}",
            flush=True,
        )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=float, nargs="+", default=[10.0, 60.0], help="clip lengths (s)")
    parser.add_argument("--generator", choices=("real", "stand-in"), default="real")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models-dir", type=Path, default=None, help="a models/ folder with SadTalker/")
    parser.add_argument("--compare-renderer", action="store_true", help="time the face generator alone")
    parser.add_argument("--size", type=int, default=256, help="--compare-renderer: 256 or 512")
    parser.add_argument("--runs", type=int, default=2, help="--compare-renderer: interleaved runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_renderer:
        compare_renderer(args)
        return
    if args.child:
        run_child(args)
        return

    with tempfile.TemporaryDirectory(prefix="talking_head_bench_") as temporary:
        work = Path(temporary)
        models_dir = args.models_dir
        if models_dir is None:
            models_dir = work / "models"
            print("writing random-weight SadTalker files ...", flush=True)
            write_random_models(models_dir)
        results = []
        for seconds in args.clips:
            command = [
                sys.executable,
                __file__,
                "--child",
                "--seconds",
                str(seconds),
                "--work-dir",
                str(work),
                "--models-dir",
                str(models_dir),
                "--generator",
                args.generator,
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
            ]
            completed = subprocess.run(command, check=True, capture_output=True, text=True)
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            results.append(result)
            duration = result["duration"]
            per_stage = "  ".join(
                f"{stage} {result['stage_seconds'][stage] / duration:.3f}" for stage in STAGES
            )
            total = sum(result["stage_seconds"].values()) / duration
            print(
                f"{seconds:g} s clip ({result['frames']} frames, generator: {args.generator}, "
                f"batch {args.batch_size}, {args.device}): compute s per video s: {per_stage}  "
                f"total {total:.3f}; peak RSS {result['peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
        if len(results) >= 2:
            first, last = results[0], results[-1]
            print(
                f"peak RSS {last['seconds']:g} s / {first['seconds']:g} s clip: "
                f"{last['peak_rss'] / first['peak_rss']:.3f}"
            )


if __name__ == "__main__":
    main()
