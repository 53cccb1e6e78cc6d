"""The headless CLI, run from a shell as a user would (subprocesses of launch.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.outputs.infotext import parse_infotext
from pipelines.outputs.saving import read_png_parameters

ROOT = Path(__file__).resolve().parent.parent


def launch(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDSTUDIO_SKIP_VENV": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def common(tiny_models_root: Path, tmp_path: Path) -> list[str]:
    return ["--models-dir", str(tiny_models_root), "--data-dir", str(tmp_path / "data")]


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_generate_writes_pngs_with_parameters(tiny_models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = launch(
        "generate",
        *common(tiny_models_root, tmp_path),
        "--out",
        str(out),
        "--model",
        "tiny-sd1",
        "--prompt",
        "a lighthouse at dusk",
        "--negative-prompt",
        "fog",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "11",
        "--batch-size",
        "2",
        "--sampler-name",
        "DPM++ 2M",
        "--scheduler",
        "Karras",
    )
    assert result.returncode == 0, result.stderr
    files = pngs(out)
    assert [f.name.split("-", 1)[1] for f in files] == ["11.png", "12.png"]
    assert [str(f) for f in files] == result.stdout.strip().splitlines()[-2:]
    info = parse_infotext(read_png_parameters(files[0]))
    assert info.prompt == "a lighthouse at dusk"
    assert info.params["Sampler"] == "DPM++ 2M"
    assert info.params["Steps"] == "2"


def test_generate_rejects_bad_fields_with_their_names(tiny_models_root: Path, tmp_path: Path) -> None:
    result = launch("generate", *common(tiny_models_root, tmp_path), "--prompt", "x", "--width", "100")
    assert result.returncode == 2
    assert "width: must be a multiple of 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_model_folder_shows_download_command(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    result = launch(
        "generate", "--models-dir", str(empty), "--data-dir", str(tmp_path / "d"), "--prompt", "x"
    )
    assert result.returncode == 3
    # the hint names the interpreter and script this test ran, as a user's would
    ran = f"{sys.executable} {ROOT / 'launch.py'}"
    assert f"{ran} download stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr


def test_models_lists_families(tiny_models_root: Path, tmp_path: Path) -> None:
    result = launch("models", *common(tiny_models_root, tmp_path), "--hash")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "SDXL" in lines["tiny-sdxl.safetensors"]
    assert "SD1.x inpainting" in lines["tiny-sd1-inpaint.safetensors"]
    assert "[" in lines["tiny-sd1.safetensors"]  # A1111 title with [hash]


def test_batch_reports_bad_lines_runs_the_rest_and_resumes(tiny_models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = tmp_path / "jobs.jsonl"
    good = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 3}
    jobs.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{this is not json",
                json.dumps({**good, "width": 100}),
                json.dumps({**good, "seed": 4, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}),
            ]
        )
        + "\n"
    )
    first = launch("batch", str(jobs), *common(tiny_models_root, tmp_path), "--out", str(out))
    assert first.returncode == 1
    assert "line 2: not valid JSON" in first.stdout + first.stderr
    assert "line 3: width: must be a multiple of 8" in first.stdout + first.stderr
    assert "4 jobs, 2 done, 2 failed" in first.stdout
    made = pngs(out)
    assert len(made) == 2

    second = launch("batch", str(jobs), *common(tiny_models_root, tmp_path), "--out", str(out))
    assert "0 done, 2 failed, 2 already done earlier" in second.stdout
    assert pngs(out) == made  # nothing redone


def test_generate_img2img_and_inpaint_from_files(tiny_models_root: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    source, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(source)
    drawn = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(drawn).rectangle((10, 10, 30, 30), fill=255)
    drawn.save(mask)
    out = tmp_path / "out"
    result = launch(
        "generate",
        *common(tiny_models_root, tmp_path),
        "--out",
        str(out),
        "--model",
        "tiny-sd1",
        "--init-images",
        str(source),
        "--mask",
        str(mask),
        "--denoising-strength",
        "0.8",
        "--prompt",
        "a window",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    (made,) = pngs(out)
    assert made.parent.parent.name == "img2img-images"
    assert "Denoising strength: 0.8" in read_png_parameters(made)

    wrong = launch("generate", *common(tiny_models_root, tmp_path), "--prompt", "x", "--mask", str(mask))
    assert wrong.returncode == 2
    assert "--mask: not a field of txt2img requests" in wrong.stderr


def test_xyz_plot_saves_a_labelled_grid(tiny_models_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "out"
    result = launch(
        "xyz",
        *common(tiny_models_root, tmp_path),
        "--out",
        str(out),
        "--model",
        "tiny-sd1",
        "--x",
        "steps=1,2",
        "--y",
        "prompt_sr=cat,dog",
        "--prompt",
        "a cat on a mat",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "9",
    )
    assert result.returncode == 0, result.stderr
    grid_line = [line for line in result.stdout.splitlines() if line.startswith("grid: ")]
    grid_path = Path(grid_line[0].removeprefix("grid: "))
    assert grid_path.parent.parent.name == "txt2img-grids"
    grid = Image.open(grid_path)
    assert grid.width >= 128 and grid.height >= 128
    cells = [p for p in pngs(out) if "txt2img-images" in str(p)]
    assert len(cells) == 4
    prompts = {parse_infotext(read_png_parameters(p)).prompt for p in cells}
    assert prompts == {"a cat on a mat", "a dog on a mat"}
    assert "X Type: Steps" in read_png_parameters(grid_path)  # A1111's axis name

    bad = launch("xyz", *common(tiny_models_root, tmp_path), "--x", "warp=1,2", "--prompt", "x")
    assert bad.returncode == 2
    assert "--x: 'warp' is not a request field" in bad.stderr


def test_generate_latent_upscale_variation_and_tiling(tiny_models_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    source = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (40, 120, 200)).save(source)
    out = tmp_path / "out"
    result = launch(
        "generate",
        *common(tiny_models_root, tmp_path),
        *("--out", str(out), "--model", "tiny-sd1", "--init-images", str(source)),
        *("--resize-mode", "3", "--width", "64", "--height", "64", "--steps", "2", "--prompt", "sea"),
        *("--subseed", "7", "--subseed-strength", "0.3", "--tiling"),
    )
    assert result.returncode == 0, result.stderr
    (made,) = pngs(out)
    parameters = read_png_parameters(made)
    assert Image.open(made).size == (64, 64)
    for expected in ("Resize mode: Just resize (latent upscale)", "Variation seed: 7", "Tiling: True"):
        assert expected in parameters
