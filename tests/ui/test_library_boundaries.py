"""``pipelines/`` and ``sadtalker/`` are libraries: importing any of their modules must not pull in
the web UI (gradio), and importing ``pipelines`` must not pull in torch (the UI's first paint and
``launch.py --help`` stay fast). The job contract imports nothing but pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def _import_everything(package: str) -> tuple[list[str], set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["modules"], set(report["loaded"])


def _top_level(loaded: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in loaded}


def test_pipelines_import_neither_gradio_nor_the_app_nor_torch() -> None:
    modules, loaded = _import_everything("pipelines")
    assert "pipelines.outputs.saving" in modules and "pipelines.generation.engine" in modules
    top = _top_level(loaded)
    assert not top & {"gradio", "fastapi", "app"}, sorted(top & {"gradio", "fastapi", "app"})
    assert "torch" not in top, "a pipelines module imports torch at import time"


def test_sadtalker_imports_neither_gradio_nor_the_app() -> None:
    modules, loaded = _import_everything("sadtalker")
    assert "sadtalker.engine" in modules
    top = _top_level(loaded)
    assert not top & {"gradio", "fastapi", "app"}, sorted(top & {"gradio", "fastapi", "app"})


def test_the_job_contract_imports_only_pydantic() -> None:
    """Validating or decoding a job (in the head, a worker, later a cluster node) needs no engine."""
    modules, loaded = _import_everything("contract")
    assert {"contract.jobs", "contract.worker", "contract.events", "contract.artifacts"} <= set(modules)
    top = _top_level(loaded)
    heavy = top & {
        "torch",
        "diffusers",
        "transformers",
        "gradio",
        "fastapi",
        "PIL",
        "numpy",
        "pipelines",
        "app",
    }
    assert not heavy, sorted(heavy)
