"""Engine overhead against plain diffusers, on a full-size SD1.5-architecture model.

No download: the model is built from ``configs/sd1`` with random weights (seeded), saved as an
A1111-style single-file checkpoint, and then
1. loaded by our registry/loader and by diffusers' ``from_single_file`` (same file, same configs),
2. used for 256x256 txt2img, a few Euler steps, by our engine and by ``StableDiffusionPipeline``
   directly (same weights, same seed), alternating runs; the ratio uses each side's best run
   (the least disturbed by other work on the machine); medians are printed too,
3. the time from ``python launch.py`` to the UI answering HTTP, against a bare gradio app.
Each line prints a ratio against the reference measured in the same run.

    .venv/bin/python bench/engine_overhead.py [--steps 4] [--runs 3] [--size 256]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_random_sd15(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.models.family_configs import load_component_config
    from pipelines.prompts.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(load_component_config("sd1", "unet"))
    vae = AutoencoderKL.from_config(load_component_config("sd1", "vae"))
    text_config = {
        k: v for k, v in load_component_config("sd1", "text_encoder").items() if not k.startswith("_")
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module in (unet, vae, text_encoder):  # keep activations finite with random weights
        for parameter in module.parameters():
            parameter.data.mul_(0.5)
    scheduler = PNDMScheduler.from_config(load_component_config("sd1", "scheduler"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 180.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def time_startup(command: list[str], port: int) -> float:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_for_http(f"http://127.0.0.1:{port}/", process)
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from app.services import StudioServices
    from app.settings import StudioSettings
    from contract.images import Txt2ImgRequest
    from pipelines.models.checkpoint_export import save_single_file_checkpoint
    from pipelines.prompts.tokenizer import build_clip_tokenizer

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    work = Path(tempfile.mkdtemp(prefix="sdstudio-bench-"))
    checkpoint = work / "models" / "Stable-diffusion" / "sd15-random.safetensors"
    print("building a random-weight SD1.5 model and saving it as a single file ...", flush=True)
    save_single_file_checkpoint(
        build_random_sd15(), "sd1", checkpoint, sidecar_yaml=False, dtype=torch.float16
    )
    print(f"  {checkpoint.stat().st_size / 2**30:.2f} GiB", flush=True)

    settings = StudioSettings(
        models_dir=work / "models", data_dir=work / "data", outputs_dir=work / "outputs"
    )
    services = StudioServices.create(settings)
    entry = services.registry.find("checkpoint", "sd15-random")
    started = time.perf_counter()
    services.registry.hashes.sha256(entry.path)
    hash_seconds = time.perf_counter() - started

    started = time.perf_counter()
    loaded = services.models.load("sd15-random")
    ours_load = time.perf_counter() - started
    started = time.perf_counter()
    reference = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=str(ROOT / "configs" / "sd1"),
        local_files_only=True,
        tokenizer=build_clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        torch_dtype=torch.float32,
    )
    diffusers_load = time.perf_counter() - started
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    del loaded

    prompt = "a photo of an astronaut riding a horse on mars"
    request = Txt2ImgRequest(
        prompt=prompt,
        sampler_name="Euler",
        steps=args.steps,
        cfg_scale=7.0,
        width=args.size,
        height=args.size,
        seed=1234,
    )
    ours, theirs = [], []
    services.engine.txt2img(request.model_copy(update={"steps": 1}))  # warm-up (memory options, caches)
    reference(
        prompt,
        num_inference_steps=1,
        height=args.size,
        width=args.size,
        generator=torch.Generator("cpu").manual_seed(1234),
    )
    for run in range(args.runs):
        started = time.perf_counter()
        services.engine.txt2img(request)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        reference(
            prompt,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            height=args.size,
            width=args.size,
            generator=torch.Generator("cpu").manual_seed(1234),
        )
        theirs.append(time.perf_counter() - started)
        print(f"  run {run + 1}: engine {ours[-1]:.2f}s, diffusers {theirs[-1]:.2f}s", flush=True)

    print()
    print(f"txt2img {args.size}x{args.size}, {args.steps} Euler steps, best (median) of {args.runs}:")
    print(f"  engine    {min(ours):7.2f} ({statistics.median(ours):.2f}) s/image (includes writing the PNG)")
    print(f"  diffusers {min(theirs):7.2f} ({statistics.median(theirs):.2f}) s/image")
    ratio = min(ours) / min(theirs)
    print(f"  ratio engine/diffusers = {ratio:.3f}  (target <= 1.03)")
    print("checkpoint load (fp16 file -> fp32 pipeline):")
    print(
        f"  ours {ours_load:.2f}s (sha256 cached; hashing once took {hash_seconds:.2f}s), "
        f"from_single_file {diffusers_load:.2f}s, ratio {ours_load / diffusers_load:.3f}"
    )

    if not args.skip_startup:
        port = 7861
        ours_start = time_startup(
            [
                sys.executable,
                "launch.py",
                "--skip-venv",
                "--port",
                str(port),
                "--data-dir",
                str(work / "data"),
                "--models-dir",
                str(work / "models"),
                "--outputs-dir",
                str(work / "outputs"),
            ],
            port,
        )
        bare = (
            "import gradio as gr\n"
            "with gr.Blocks() as demo:\n    gr.Textbox()\n"
            f"demo.launch(server_port={port})\n"
        )
        bare_start = time_startup([sys.executable, "-c", bare], port)
        print("startup to first HTTP answer:")
        ratio = ours_start / bare_start
        print(f"  launch.py {ours_start:.2f}s, bare gradio app {bare_start:.2f}s, ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
