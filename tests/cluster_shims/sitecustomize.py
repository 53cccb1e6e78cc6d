"""Test-only start-up code for the Ray node processes of ``tests/test_cluster.py`` (on their
``PYTHONPATH``): once ``sadtalker.engine`` is imported there, every loaded SadTalker set gets the cheap
stand-in face generator, as the in-process talking-head tests swap it after loading (a real one costs
~15 s a frame on these CPUs). Nothing is imported until a worker imports the engine itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any


def _use_cheap_generator(module: Any) -> None:
    original = module.TalkingHeadEngine.models

    def models(self: Any, size: int) -> Any:
        from tests.sadtalker.helpers import CheapGenerator

        loaded = original(self, size)
        if not isinstance(loaded.generator, CheapGenerator):
            loaded.generator = CheapGenerator()
        return loaded

    module.TalkingHeadEngine.models = models


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "sadtalker.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _use_cheap_generator(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PatchOnImport())
