"""Issue 12, item 8: the details a user notices, checked from a shell as a user meets them: hints
that name the command they actually ran, batch resume keyed on a job's content, X/Y/Z grid labels
in A1111's words, and an outpainted picture's infotext that gives its real size."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from installer.launch_command import LAUNCH_COMMAND_ENV, detect_launch_command, launch_command
from pipelines.outputs.grids import Axis
from pipelines.outputs.infotext import parse_infotext
from pipelines.outputs.saving import read_png_parameters

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


def shell(command: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a POSIX shell from the repository, the venv's interpreters first on PATH
    (as an activated venv has them), so ``python3 launch.py`` means what it means to a user."""
    base = {k: v for k, v in os.environ.items() if k != LAUNCH_COMMAND_ENV}
    base.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "SDSTUDIO_SKIP_VENV": "1",
        }
    )
    return subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_detect_launch_command_keeps_what_was_typed() -> None:
    assert detect_launch_command(["python3", "launch.py", "--listen"], "launch.py") == "python3 launch.py"
    assert detect_launch_command(["py", "launch.py"], "launch.py") == "py launch.py"
    spaced = detect_launch_command(["/opt/my python/bin/python"], "launch.py")
    assert spaced == "'/opt/my python/bin/python' launch.py"  # quoted, so it can be pasted
    assert detect_launch_command([], "") == "launch.py"


def test_launch_command_without_a_recorded_command_is_readmes() -> None:
    assert launch_command("doctor", system="linux", environ={}) == "python3 launch.py doctor"
    assert launch_command("doctor", system="win32", environ={}) == r".\launch.bat doctor"
    recorded = {LAUNCH_COMMAND_ENV: "python launch.py"}
    assert launch_command("download", "x", system="win32", environ=recorded) == "python launch.py download x"


@pytest.mark.parametrize("interpreter", ["python3", "python"])
def test_hints_name_the_interpreter_the_user_ran(interpreter: str, tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    flags = f"--models-dir {shlex.quote(str(empty))} --data-dir {shlex.quote(str(tmp_path / 'd'))}"
    result = shell(f"{interpreter} launch.py generate {flags} --prompt x")
    assert result.returncode == 3, result.stderr
    hint = re.search(r"(?m)^\s*(\S+) launch\.py download stable-diffusion-v1-5/", result.stderr)
    assert hint is not None and hint.group(1) == interpreter, result.stderr


def test_hints_name_launch_bat_when_it_started_the_studio(tmp_path: Path) -> None:
    """``launch.bat`` records itself before starting Python; the hint then says ``.\\launch.bat``."""
    empty = tmp_path / "models"
    empty.mkdir()
    flags = f"--models-dir {shlex.quote(str(empty))} --data-dir {shlex.quote(str(tmp_path / 'd'))}"
    bat = {LAUNCH_COMMAND_ENV: r".\launch.bat"}
    result = shell(f"python3 launch.py generate {flags} --prompt x", env=bat)
    assert result.returncode == 3, result.stderr
    assert r".\launch.bat download stable-diffusion-v1-5/" in result.stderr
    assert "python3 launch.py download" not in result.stderr


def test_batch_resume_after_inserting_a_line_runs_only_the_new_line(
    tiny_models_root: Path, tmp_path: Path
) -> None:
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    job = {"prompt": "a red apple", "steps": 1, "width": 64, "height": 64}
    first, second, inserted = ({**job, "seed": seed} for seed in (3, 4, 5))
    jobs.write_text(f"{json.dumps(first)}\n{json.dumps(second)}\n", encoding="utf-8")
    command = (
        f"python3 launch.py batch {shlex.quote(str(jobs))} --models-dir {shlex.quote(str(tiny_models_root))} "
        f"--data-dir {shlex.quote(str(tmp_path / 'data'))} --out {shlex.quote(str(out))} --ckpt tiny-sd1"
    )
    run = shell(command)
    assert run.returncode == 0, run.stderr
    assert "2 jobs, 2 done, 0 failed" in run.stdout
    # a new first line, and the old first line rewritten with other key order and spacing
    reordered = json.dumps(dict(reversed(list(first.items()))), indent=None, separators=(", ", ": "))
    jobs.write_text(f"{json.dumps(inserted)}\n{reordered}\n{json.dumps(second)}\n", encoding="utf-8")
    again = shell(command)
    assert again.returncode == 0, again.stderr
    assert "3 jobs, 1 done, 0 failed, 2 already done earlier" in again.stdout
    made = sorted(p.name.split("-", 1)[1] for p in out.rglob("*.png"))
    assert made == ["3.png", "4.png", "5.png"]


def test_batch_runs_identical_lines_once_each(tiny_models_root: Path, tmp_path: Path) -> None:
    """The same request twice is two jobs (e.g. two random-seed pictures), and both are remembered."""
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    line = json.dumps({"prompt": "a pear", "steps": 1, "width": 64, "height": 64, "seed": 8})
    jobs.write_text(f"{line}\n{line}\n", encoding="utf-8")
    command = (
        f"python3 launch.py batch {shlex.quote(str(jobs))} --models-dir {shlex.quote(str(tiny_models_root))} "
        f"--data-dir {shlex.quote(str(tmp_path / 'data'))} --out {shlex.quote(str(out))} --ckpt tiny-sd1"
    )
    assert "2 jobs, 2 done" in shell(command).stdout
    assert "2 jobs, 0 done, 0 failed, 2 already done earlier" in shell(command).stdout


def test_grid_labels_use_a1111_axis_names() -> None:
    fields = {"cfg_scale", "steps", "sampler_name", "mask_blur"}
    cfg = Axis.parse("cfg_scale=5,7", fields, option="--x")
    assert cfg.label == "CFG Scale" and cfg.cell_label("5") == "CFG Scale: 5"
    assert Axis.parse("CFG Scale=5", fields, option="--x").field == "cfg_scale"  # A1111's name works too
    assert Axis.parse("steps=10", fields, option="--y").cell_label("10") == "Steps: 10"
    assert Axis.parse("sampler_name=Euler a", fields, option="--y").cell_label("Euler a") == "Euler a"
    assert Axis.parse("mask-blur=4", fields, option="--z").cell_label("4") == "Mask blur: 4"


def test_xyz_infotext_names_axes_as_a1111(tiny_models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = shell(
        f"python3 launch.py xyz --models-dir {shlex.quote(str(tiny_models_root))} "
        f"--data-dir {shlex.quote(str(tmp_path / 'data'))} --out {shlex.quote(str(out))} --model tiny-sd1 "
        "--x cfg_scale=5,7 --prompt 'a cat' --steps 1 --width 64 --height 64 --seed 2"
    )
    assert result.returncode == 0, result.stderr
    (grid_line,) = (line for line in result.stdout.splitlines() if line.startswith("grid: "))
    grid = Path(grid_line.removeprefix("grid: "))
    assert 'X Type: CFG Scale, X Values: "5,7"' in read_png_parameters(grid)


def test_outpainted_picture_infotext_gives_its_real_size(tiny_models_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    source, out = tmp_path / "photo.png", tmp_path / "out"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(source)
    result = shell(
        f"python3 launch.py generate --models-dir {shlex.quote(str(tiny_models_root))} "
        f"--data-dir {shlex.quote(str(tmp_path / 'data'))} --out {shlex.quote(str(out))} --model tiny-sd1 "
        f"--init-images {shlex.quote(str(source))} --outpaint-left 32 --prompt 'a wall' --steps 2 "
        "--denoising-strength 0.8 --seed 1"
    )
    assert result.returncode == 0, result.stderr
    (made,) = out.rglob("*.png")
    assert Image.open(made).size == (96, 64)
    info = parse_infotext(read_png_parameters(made))
    assert info.params["Size"] == "96x64"
    assert (info.width, info.height) == (96, 64)  # what "send to img2img" puts in the size fields


def test_every_button_has_words_not_only_an_emoji(studio: object) -> None:
    """A font without emoji draws 🔄/🎲/♻️ as empty boxes: every button says in words what it does."""
    import gradio as gr

    from app.ui import build_ui

    demo = build_ui(studio)  # type: ignore[arg-type]
    buttons = [block for block in demo.blocks.values() if isinstance(block, gr.Button)]
    assert len(buttons) > 20
    wordless = [(b.elem_id, b.value) for b in buttons if not re.search(r"[A-Za-z]", str(b.value or ""))]
    assert wordless == []


def test_checkpoint_cards_mark_the_one_in_use_and_a_click_picks_by_file(studio: object) -> None:
    from app.ui.extra_networks_panel import CardCatalogue, cards_html, picked_checkpoint

    cards = CardCatalogue(studio).cards("tiny-sd1.safetensors")  # type: ignore[arg-type]
    page = cards_html(cards, "txt2img", "checkpoint", selected="tiny-sd1.safetensors")
    assert re.findall(r'sd-card-selected" data-name="([^"]+)"', page) == ["tiny-sd1"]
    assert page.count("✓ in use") == 1
    assert "txt2img_checkpoint_pick" in page  # the click hands the name to the tab
    update = picked_checkpoint(studio, "tiny-sdxl\n1712345678", "tiny-sd1.safetensors")  # type: ignore[arg-type]
    assert update["value"] == "tiny-sdxl.safetensors"  # as the dropdown lists it
