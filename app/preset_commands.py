"""``launch.py preset`` (run or list presets headless) and ``launch.py bot`` (the Discord bot).

``preset NAME --image photo.jpg --prompt "..."`` builds the same request the API and the UI build
from a preset and runs it in this process, as ``generate`` does; the image paths are printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import StudioError

if TYPE_CHECKING:
    from app.settings import StudioSettings


def add_preset_commands(commands: Any, shared: Sequence[argparse.ArgumentParser]) -> None:
    preset = commands.add_parser(
        "preset", parents=list(shared), help="run a preset on a photo and a few words (no NAME: list presets)"
    )
    preset.add_argument("name", nargs="?", help="preset name (a file in presets/)")
    preset.add_argument("--image", type=Path, help="the photo: JPEG, PNG, WebP or HEIC")
    preset.add_argument("--prompt", default="", help="the few words that fill the preset's {prompt}")
    preset.add_argument("--seed", type=int, help="seed (default: random)")
    preset.add_argument("--out", type=Path, help="output folder (default: outputs/)")

    bot = commands.add_parser(
        "bot",
        parents=list(shared),
        help="Discord gateway bot (and the studio's UI/API in the same process); 'bot register': /draw",
    )
    bot.add_argument("action", nargs="?", choices=["run", "register"], default="run")
    bot.add_argument("--guild", help="register for this server only (appears at once)")
    bot.add_argument(
        "--headless", action="store_true", help="the bot alone: do not serve the web UI and API beside it"
    )


def run_preset(args: argparse.Namespace, settings: StudioSettings) -> int:
    from app.presets import PresetStore, list_presets, preset_request_for
    from app.services import StudioServices

    services = StudioServices.create(settings, outputs_dir=args.out)
    store = PresetStore.for_services(services)
    if not args.name:
        items = list_presets(store, services.registry)
        if not items:
            print(f"no presets in {store.folder} (see presets/README.md)")
        for item in items:
            state = "ready" if item.get("ready") else f"NOT READY: {item.get('error')}"
            print(f"{item['name']:<32} {item.get('mode', ''):<8} {state}")
        return 0
    photo: bytes | None = None
    if args.image is not None:
        try:
            photo = args.image.read_bytes()
        except OSError as exc:
            print(f"error: --image {args.image}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        preset, request = preset_request_for(services, store, args.name, args.prompt, photo, seed=args.seed)
        result = services.executor.execute(request)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    paths = [str(image.path) for image in result.images]
    if preset.safety_checker:
        from app.safety_checker import screen_files

        for path, flagged in zip(paths, screen_files(settings.models_dir, paths), strict=True):
            if flagged:
                print(f"note: the safety checker held back {path} (replaced by a black image)")
    for note in result.notes:
        print(f"note: {note}")
    for path in paths:
        print(path)
    return 0


def run_bot(args: argparse.Namespace, settings: StudioSettings) -> int:
    from app.discord.gateway import run_bot as run

    return run(args, settings)
