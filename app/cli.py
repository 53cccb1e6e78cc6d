"""Headless command line: ``generate``, ``batch``, ``download`` and ``models``.

``generate`` takes every request field as a flag (``--cfg-scale 7``), built from the same pydantic
model the UI and API use, so a new field is a new flag with no extra code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app.preset_commands import add_preset_commands, run_bot, run_preset
from app.settings import StudioSettings
from contract.images import REQUEST_TYPES, format_validation_error, parse_request
from contract.jobs import parse_job_request
from contract.talking_head import TalkingHeadRequest
from pipelines.errors import StudioError

_SKIPPED_FLAGS = {"mode", "override_settings_restore_afterwards", "send_images", "save_images"}
_SKIPPED_TALK_FLAGS = {"mode"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    return annotation


def _literal_choices(kind: Any) -> list[Any] | None:
    """The allowed values of a ``Literal[...]`` annotation (``None`` for anything else)."""
    return list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None


def _limits_text(info: FieldInfo) -> str:
    """``0-45, default 0``: the field's bounds and default as a flag's help shows them."""
    low = next((item.ge for item in info.metadata if getattr(item, "ge", None) is not None), None)
    high = next((item.le for item in info.metadata if getattr(item, "le", None) is not None), None)
    parts = []
    if low is not None and high is not None:
        parts.append(f"{low} to {high}")
    elif low is not None:
        parts.append(f"at least {low}")
    elif high is not None:
        parts.append(f"at most {high}")
    if not info.is_required() and info.default is not None and not isinstance(info.default, list):
        parts.append(f"default {info.default}")
    return f" ({', '.join(parts)})" if parts else ""


def add_field_arguments(
    group: argparse._ArgumentGroup | argparse.ArgumentParser,
    fields: Iterable[tuple[str, FieldInfo]],
    *,
    skipped: Iterable[str] = (),
    required: Iterable[str] = (),
    show_limits: bool = False,
) -> None:
    """One flag per pydantic field (``pose_style`` -> ``--pose-style``), typed from its annotation:
    booleans as ``--x/--no-x``, numbers and strings typed, ``Path`` as a path, ``Literal`` as
    choices, lists as several values (``--input-yaw 0 15 -10``), anything else as JSON. Defaults
    stay with the model (``None`` = not given); the help is the field's description (plus its
    range and default with ``show_limits``). The first of several fields with one name wins."""
    omitted = set(skipped)
    needed = set(required)
    seen: set[str] = set()
    for name, info in fields:
        if name in omitted or name in seen:
            continue
        seen.add(name)
        kind = _scalar_type(info.annotation)
        help_text = (info.description or "") + (_limits_text(info) if show_limits else "")
        flag = {"dest": name, "default": None, "help": help_text}
        if name in needed:
            flag["required"] = True
        choices = _literal_choices(kind)
        if kind is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **flag)
        elif kind in (int, float, str, Path):
            group.add_argument(_flag(name), type=kind, **flag)
        elif choices is not None:
            group.add_argument(_flag(name), type=type(choices[0]), choices=choices, **flag)
        elif typing.get_origin(kind) is list or kind is list:
            items = typing.get_args(kind)
            item_type = items[0] if items and items[0] in (int, float, str) else None
            at_least_one = any(getattr(item, "min_length", None) for item in info.metadata)
            group.add_argument(_flag(name), nargs="+" if at_least_one else "*", type=item_type, **flag)
        else:
            flag["help"] = f"{help_text} (JSON)"
            group.add_argument(_flag(name), type=json.loads, **flag)


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of every request kind (A1111's txt2img, img2img and extras names);
    defaults are left to the models (None = not given)."""
    group = parser.add_argument_group("request fields (A1111 API names)")
    fields = [(name, info) for model in REQUEST_TYPES.values() for name, info in model.model_fields.items()]
    add_field_arguments(group, fields, skipped=_SKIPPED_FLAGS)


def add_talking_head_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``talk`` flags: one per ``TalkingHeadRequest`` field (the API's names), so a new field is
    a new flag; ``--image`` and ``--audio`` are required file paths."""
    group = parser.add_argument_group("talking-head request fields (API names)")
    add_field_arguments(
        group,
        TalkingHeadRequest.model_fields.items(),
        skipped=_SKIPPED_TALK_FLAGS,
        required=("image", "audio"),
        show_limits=True,
    )


def talking_head_request_from_args(args: argparse.Namespace) -> TalkingHeadRequest:
    """The request the ``talk`` flags describe (absent flags keep the model's defaults)."""
    given = {
        name: value
        for name in TalkingHeadRequest.model_fields
        if name not in _SKIPPED_TALK_FLAGS and (value := getattr(args, name, None)) is not None
    }
    return TalkingHeadRequest(**given)


def flag_vocabulary(message: str) -> str:
    """Validation lines in the words of the command line: ``init_images.0: file not found: x.png``
    becomes ``--init-images: file not found: x.png`` (nested fields such as ControlNet units keep
    their JSON path, which is how ``--controlnet-units`` is written)."""
    import re

    known = {name for model in REQUEST_TYPES.values() for name in model.model_fields}

    def line(text: str) -> str:
        match = re.match(r"([a-z_0-9]+)(?:\.\d+)?: (.*)", text, flags=re.S)
        if match is None or match.group(1) not in known or match.group(1) == "controlnet_units":
            return text
        return f"{_flag(match.group(1))}: {match.group(2)}"

    return "\n".join(line(text) for text in message.splitlines())


def request_from_args(args: argparse.Namespace) -> Any:
    """The request the flags describe: ``--mode``, else img2img when ``--init-images`` is given,
    extras when only ``--image`` is, else txt2img. Flags of other modes are rejected by name."""
    mode = args.mode or ("img2img" if args.init_images else "extras" if args.image else "txt2img")
    model = REQUEST_TYPES[mode]
    given = {
        name: value
        for name in {n for m in REQUEST_TYPES.values() for n in m.model_fields}
        if (value := getattr(args, name, None)) is not None
    }
    foreign = sorted(name for name in given if name not in model.model_fields)
    if foreign:
        flags = ", ".join(_flag(name) for name in foreign)
        raise ValueError(f"{flags}: not a field of {mode} requests")
    if getattr(args, "model", None):
        given["override_settings"] = {**given.get("override_settings", {}), "sd_model_checkpoint": args.model}
    return parse_request({**given, "mode": mode})


# ----------------------------------------------------------------------------------------------
# progress display
# ----------------------------------------------------------------------------------------------
class _ProgressBars:
    """A tqdm bar for the steps of the current job (and the caller's overall bar)."""

    def __init__(self, label: str, position: int = 1) -> None:
        self.label = label
        self.position = position
        self._bar: Any = None
        self._batch = -1

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        if event.stage == "loading" and event.message:
            tqdm.write(event.message)
            return
        if event.stage != "sampling":
            return
        if self._bar is None or event.batch_index != self._batch:
            self.close()
            self._batch = event.batch_index
            desc = f"{self.label} batch {event.batch_index + 1}/{event.batch_count}"
            self._bar = tqdm(total=event.steps, desc=desc, unit="step", position=self.position, leave=False)
        self._bar.n = event.step
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def _services(settings: StudioSettings, out: Path | None) -> Any:
    from app.services import StudioServices

    return StudioServices.create(settings, outputs_dir=out)


def _explain_missing_models(services: Any) -> bool:
    if services.registry.checkpoints():
        return False
    from pipelines.models.registry import no_checkpoints_message

    print(no_checkpoints_message(services.registry.paths.folder("checkpoint")), file=sys.stderr)
    return True


def run_generate(args: argparse.Namespace, settings: StudioSettings) -> int:
    try:
        request = request_from_args(args)
    except ValidationError as exc:
        print(f"error: invalid request:\n{flag_vocabulary(format_validation_error(exc))}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    services = _services(settings, args.out)
    if _explain_missing_models(services):
        return 3
    bars = _ProgressBars("generate", position=0)
    from pipelines.job_control import JobControl

    control = JobControl()
    try:
        with _ctrl_c_interrupts(control):
            result = services.executor.execute(request, control=control, on_progress=bars)
    except StudioError as exc:
        bars.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bars.close()
    for note in result.notes:
        print(f"note: {note}")
    if result.interrupted:
        print(
            f"interrupted: kept {len(result.images)} image(s); the last one as it stood when you "
            "pressed Ctrl+C (its infotext says 'Interrupted')",
            file=sys.stderr,
        )
    for image in result.images:
        print(image.path)
    return 0


@contextmanager
def _ctrl_c_interrupts(control: Any) -> Iterator[None]:
    """The first Ctrl+C interrupts the job as the UI's Interrupt does (the partly denoised picture
    is decoded and saved); a second one stops the program at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_ctrl_c(_signum: int, _frame: Any) -> None:
        if control.interrupted:
            raise KeyboardInterrupt
        print("\nInterrupting: saving the picture as it is now (Ctrl+C again to quit)", file=sys.stderr)
        control.interrupt()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class BatchSummary:
    done: int = 0
    failed: int = 0
    resumed: int = 0
    failures: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def _batch_state_file(jobs_file: Path, out_root: Path) -> Path:
    key = hashlib.sha256(str(jobs_file.resolve()).encode()).hexdigest()[:12]
    return out_root / ".batch-state" / f"{jobs_file.stem}-{key}.jsonl"


def _job_key(line: str, occurrence: int) -> str:
    """What a finished job is remembered by: its content, not its line number, so inserting,
    moving or deleting lines reruns only the lines that are new. JSON is compared canonically
    (key order and spacing do not matter); ``occurrence`` (1 for the first copy) keeps deliberate
    duplicates (the same request twice, e.g. with random seeds) as separate jobs."""
    try:
        content = json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"))
    except ValueError:
        content = line.strip()
    return hashlib.sha256(f"{occurrence}\n{content}".encode()).hexdigest()


def _job_keys(jobs: Sequence[tuple[int, str]]) -> dict[int, str]:
    """Line number -> :func:`_job_key`, counting identical jobs in file order."""
    seen: dict[str, int] = {}
    keys: dict[int, str] = {}
    for number, line in jobs:
        first = _job_key(line, 1)
        seen[first] = seen.get(first, 0) + 1
        keys[number] = first if seen[first] == 1 else _job_key(line, seen[first])
    return keys


def _completed_keys(state_file: Path) -> set[str]:
    keys = set()
    if state_file.is_file():
        for raw in state_file.read_text(encoding="utf-8").splitlines():
            try:
                keys.add(json.loads(raw)["key"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run: that job simply runs again
    return keys


def run_batch(args: argparse.Namespace, settings: StudioSettings) -> int:
    """Run a JSONL file of requests; finished lines are recorded so a rerun resumes."""
    from tqdm import tqdm

    jobs_file = Path(args.jobs)
    if not jobs_file.is_file():
        print(f"error: batch file not found: {jobs_file}", file=sys.stderr)
        return 2
    lines = jobs_file.read_text(encoding="utf-8").splitlines()
    services = _services(settings, args.out)
    out_root = services.engine.config.outputs_root
    state_file = _batch_state_file(jobs_file, out_root)
    completed = _completed_keys(state_file)
    jobs = [
        (n, line)
        for n, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    keys = _job_keys(jobs)
    summary = BatchSummary()
    if _explain_missing_models(services):
        return 3
    overall = tqdm(total=len(jobs), desc="batch", unit="job", position=0)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    for number, line in jobs:
        key = keys[number]
        if key in completed:
            summary.resumed += 1
            tqdm.write(f"line {number}: already done in an earlier run, skipped")
            overall.update(1)
            continue
        try:
            payload = json.loads(line)
            if not isinstance(payload, dict):
                raise ValueError("each line must be a JSON object")
            request = parse_job_request(payload)
        except json.JSONDecodeError as exc:
            summary.failed += 1
            summary.failures.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            tqdm.write(summary.failures[-1])
            overall.update(1)
            continue
        except ValidationError as exc:
            summary.failed += 1
            summary.failures.append(f"line {number}: " + format_validation_error(exc).replace("\n", "; "))
            tqdm.write(summary.failures[-1])
            overall.update(1)
            continue
        except ValueError as exc:
            summary.failed += 1
            summary.failures.append(f"line {number}: {exc}")
            tqdm.write(summary.failures[-1])
            overall.update(1)
            continue
        bars = _ProgressBars(f"line {number}", position=1)
        try:
            result = services.executor.execute(request, on_progress=bars)
        except StudioError as exc:
            bars.close()
            summary.failed += 1
            summary.failures.append(f"line {number}: {exc}")
            tqdm.write(summary.failures[-1])
            overall.update(1)
            continue
        bars.close()
        paths = [str(image.path) for image in result.images]
        summary.images.extend(paths)
        summary.done += 1
        with state_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "line": number, "images": paths}) + "\n")
            handle.flush()
        overall.update(1)
    overall.close()
    print(
        f"batch finished: {len(jobs)} jobs, {summary.done} done, {summary.failed} failed, "
        f"{summary.resumed} already done earlier; {len(summary.images)} images written under {out_root}"
    )
    for failure in summary.failures:
        print(f"  failed: {failure}")
    return 1 if summary.failed else 0


def run_models(args: argparse.Namespace, settings: StudioSettings) -> int:
    services = _services(settings, None)
    entries = services.registry.checkpoints()
    if not entries:
        _explain_missing_models(services)
        return 0
    for entry in entries:
        if args.hash:
            services.registry.short_hash(entry, compute=True)
        info = services.registry.describe(entry)
        size = (
            f"{entry.size_bytes / 2**30:.2f} GiB"
            if entry.size_bytes >= 2**30
            else f"{entry.size_bytes / 2**20:.1f} MiB"
        )
        print(f"{info['title']:<60} {info['family']:<28} {size}")
    return 0


def run_download(args: argparse.Namespace, settings: StudioSettings) -> int:
    from pipelines.models.download import DownloadError, download_model

    try:
        paths = download_model(
            args.source,
            settings.models_dir,
            kind=args.kind,
            filename=args.file,
            revision=args.revision,
            allow_pickle=args.allow_pickle,
            token=args.token,
            variant=args.variant,
            on_message=print,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def build_parser(
    parent: argparse.ArgumentParser | None = None, common: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Sub-commands; ``common`` parsers add flags valid after any command (``generate --medvram``)."""
    parser = parent or argparse.ArgumentParser(prog="launch.py")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = list(common)

    generate = commands.add_parser("generate", parents=shared, help="generate images headless and exit")
    generate.add_argument("--model", help="checkpoint name (with or without extension or [hash])")
    generate.add_argument("--out", type=Path, help="output folder (default: outputs/)")
    generate.add_argument("--mode", choices=list(REQUEST_TYPES), help="default: inferred from the flags")
    add_request_arguments(generate)

    xyz = commands.add_parser("xyz", parents=shared, help="X/Y/Z plot: vary fields, save a labelled grid")
    xyz.add_argument("--x", required=True, help="FIELD=V1,V2,... (e.g. steps=10,20 or cfg_scale=5-9 (+2))")
    xyz.add_argument("--y", help="second axis, same syntax")
    xyz.add_argument("--z", help="third axis, same syntax")
    xyz.add_argument("--model", help="checkpoint name")
    xyz.add_argument("--out", type=Path, help="output folder (default: outputs/)")
    xyz.add_argument("--mode", choices=list(REQUEST_TYPES), help="default: inferred from the flags")
    add_request_arguments(xyz)

    talk = commands.add_parser("talk", parents=shared, help="talking head: portrait + speech -> MP4")
    talk.add_argument("--out", type=Path, help="output folder (default: outputs/)")
    add_talking_head_arguments(talk)

    batch = commands.add_parser("batch", parents=shared, help="run a JSONL file of requests (resumable)")
    batch.add_argument("jobs", help="JSONL file: one request object per line")
    batch.add_argument("--out", type=Path, help="output folder (default: outputs/)")

    models = commands.add_parser("models", parents=shared, help="list checkpoints with family, size and hash")
    models.add_argument(
        "--hash", action="store_true", help="compute missing sha256 hashes (reads every file)"
    )

    download = commands.add_parser(
        "download", parents=shared, help="download a model from the Hugging Face hub or a URL"
    )
    download.add_argument("source", help="owner/repo, owner/repo/file.safetensors, or an https URL")
    download.add_argument("--file", help="file inside the repo")
    download.add_argument(
        "--kind", default="Stable-diffusion", help="models/ sub-folder (default Stable-diffusion)"
    )
    download.add_argument("--revision", help="branch, tag or commit")
    download.add_argument("--allow-pickle", action="store_true", help="also allow .ckpt/.pt/.pth/.bin files")
    download.add_argument("--token", help="Hugging Face token (default: $HF_TOKEN)")
    download.add_argument("--variant", help="diffusers weight variant, e.g. fp16")

    doctor = commands.add_parser(
        "doctor",
        parents=shared,
        help="report GPU, PyTorch, models, disk and what looks wrong (for bug reports)",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    add_preset_commands(commands, shared)
    return parser


def run_xyz(args: argparse.Namespace, settings: StudioSettings) -> int:
    """A1111's X/Y/Z plot from the shell: one job per cell, then a labelled grid image."""
    from pipelines.outputs.grids import Axis, GridAxisError, cell_overrides, combinations, draw_grid
    from pipelines.outputs.saving import dated_output_dir, save_image_atomically

    try:
        base = request_from_args(args)
        fields = set(type(base).model_fields)
        axes = [
            Axis.parse(text, fields, option=f"--{name}")
            for name, text in (("x", args.x), ("y", args.y), ("z", args.z))
            if text
        ]
    except ValidationError as exc:
        print(f"error: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    except (GridAxisError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    services = _services(settings, args.out)
    if _explain_missing_models(services):
        return 3
    payload = base.model_dump(mode="json")
    cells = {}
    try:
        requests = [
            (combo, parse_request(cell_overrides(payload, axes, combo))) for combo in combinations(axes)
        ]
    except ValidationError as exc:
        print(f"error: a grid value is invalid:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    for combo, request in tqdm(requests, desc="grid", unit="cell"):
        try:
            result = services.executor.execute(request)
        except StudioError as exc:
            print(
                f"error: cell {', '.join(a.cell_label(v) for a, v in zip(axes, combo, strict=True))}: {exc}",
                file=sys.stderr,
            )
            return 1
        cells[combo] = result.images[0].image
        print(result.images[0].path)
    grid = draw_grid(cells, axes)
    summary = ", ".join(
        f'{"XYZ"[i]} Type: {axis.label}, {"XYZ"[i]} Values: "{",".join(axis.values)}"'
        for i, axis in enumerate(axes)
    )
    infotext = f"{base.prompt}\nScript: X/Y/Z plot, {summary}" if hasattr(base, "prompt") else summary
    folder = dated_output_dir(
        services.engine.config.outputs_root, payload.get("mode", "txt2img"), kind="grids"
    )
    path = save_image_atomically(grid, folder, seed=int(payload.get("seed", 0) or 0), infotext=infotext)
    print(f"grid: {path}")
    return 0


def run_talk(args: argparse.Namespace, settings: StudioSettings) -> int:
    """Portrait + speech -> MP4, with a progress bar per stage."""
    from tqdm import tqdm

    from sadtalker.errors import SadTalkerError

    try:
        request = talking_head_request_from_args(args)
    except ValidationError as exc:
        print(f"error: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    services = _services(settings, args.out)
    bars: dict[str, Any] = {}

    def on_progress(event: Any) -> None:
        if event.stage != "sampling" or not event.message:
            return
        bar = bars.get(event.message)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[event.message] = tqdm(total=event.steps, desc=event.message, unit="frame")
        bar.total = event.steps
        bar.n = event.step
        bar.refresh()

    try:
        result = services.executor.execute(request, on_progress=on_progress)
    except (SadTalkerError, StudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    info = result.info()
    timing = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in info["stage_seconds"].items())
    print(f"{info['frames']} frames, {info['duration']:.2f}s, seed {info['seed']} ({timing})")
    print(result.images[0].path)
    return 0


def run_doctor(args: argparse.Namespace, settings: StudioSettings) -> int:
    from app.doctor import run_doctor as report

    return report(args, settings)


COMMANDS = {
    "generate": run_generate,
    "xyz": run_xyz,
    "talk": run_talk,
    "batch": run_batch,
    "models": run_models,
    "download": run_download,
    "doctor": run_doctor,
    "preset": run_preset,
    "bot": run_bot,
}


def main(argv: Sequence[str] | None = None, settings: StudioSettings | None = None) -> int:
    from app.settings import load_settings

    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    return COMMANDS[args.command](args, settings or load_settings())
