"""``launch.py`` as a test server whose talking-head face generator is the cheap stand-in.

Browser tests need the studio in its own process, where a test cannot reach the engine to swap the
generator as the in-process tests do (``engine.models(256).generator = CheapGenerator()``). The
real generator with the random-weight files costs ~15 s per 256-pixel frame on the CI's shared CPUs
(a 1.5 s clip: minutes), and its size is fixed by the checkpoint layout, so a smaller real one is
not an option either. So the test process starts this module instead of ``launch.py``: it wraps
``TalkingHeadEngine.models`` to put ``tests.sadtalker.helpers.CheapGenerator`` in place of the
generator it loaded (every other network stays the real one from the files), then runs
``launch.main`` with the same arguments plus ``--in-process-workers`` (the swap lives in this
process; worker processes are tested in ``tests/test_workers.py``). Nothing else differs from a
user's ``launch.py``.

Run from the repository root: ``python -m tests.ui.talking_head_server --port ... [launch.py flags]``.
"""

from __future__ import annotations

import sys
from typing import Any


def use_cheap_generator() -> None:
    """Every SadTalker model set the engine loads gets the cheap generator."""
    from sadtalker.engine import TalkingHeadEngine
    from tests.sadtalker.helpers import CheapGenerator

    load = TalkingHeadEngine.models

    def models_with_cheap_generator(self: TalkingHeadEngine, size: int) -> Any:
        loaded = load(self, size)
        if not isinstance(loaded.generator, CheapGenerator):
            loaded.generator = CheapGenerator()
        return loaded

    TalkingHeadEngine.models = models_with_cheap_generator  # type: ignore[method-assign]


if __name__ == "__main__":
    import launch

    use_cheap_generator()
    sys.exit(launch.main([*sys.argv[1:], "--in-process-workers"]))
