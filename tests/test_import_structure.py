"""The layout of ``pipelines/`` stays acyclic: no module imports a module that (directly or
through others) imports it back, neither at module top nor inside a function (a lazy import that
closes a circle is a circle all the same; only ``TYPE_CHECKING`` blocks, which never run, are not
counted). Heavy libraries stay lazy: sibling imports at module top must not pull in torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, *, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module level, including inside ``if``/``try``
    blocks, but not inside ``if TYPE_CHECKING:``; with ``in_functions`` also those in function and
    class bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if in_functions:
                pending.extend(node.body)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With | ast.For | ast.While):
            pending.extend([*node.body, *getattr(node, "orelse", [])])
    return found


def import_graph(root: Path = ROOT, *, in_functions: bool = False) -> dict[str, set[str]]:
    """``module -> pipelines modules it imports`` (at its top; with ``in_functions`` anywhere) for
    every file under ``root/pipelines``."""
    files = {_module_name(path, root): path for path in sorted((root / "pipelines").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _imports(tree, in_functions=in_functions):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                # ``from pipelines.controlnet import annotators`` imports the submodule.
                names = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                    for alias in node.names
                ]
            else:
                names = []
            targets.update(name for name in names if name in files and name != module)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_the_package_layout() -> None:
    graph = import_graph()
    assert "pipelines.controlnet.apply" in graph
    assert "pipelines.controlnet.preprocessors" in graph["pipelines.controlnet.apply"]
    # ``from pipelines.controlnet import annotators as ...`` counts as importing the submodule.
    assert "pipelines.controlnet.annotators" in graph["pipelines.controlnet.preprocessors"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_pipelines_modules_import_each_other_without_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle at module top: " + " -> ".join(cycle or [])


def test_no_cycle_hides_in_a_function_level_import() -> None:
    cycle = find_cycle(import_graph(in_functions=True))
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle or [])


def test_a_lazy_import_closing_a_circle_is_found(tmp_path: Path) -> None:
    """The shape the old ``checkpoint_loader``/``registry`` pair had."""
    package = tmp_path / "pipelines"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "loader.py").write_text("from pipelines.registry import ENTRY\n")
    (package / "registry.py").write_text(
        "ENTRY = 1\n\n\ndef read():\n    from pipelines.loader import load\n\n    return load\n"
    )
    assert find_cycle(import_graph(tmp_path)) is None
    assert find_cycle(import_graph(tmp_path, in_functions=True)) == [
        "pipelines.loader",
        "pipelines.registry",
        "pipelines.loader",
    ]


_LIGHT_MODULES = (
    "pipelines.controlnet.apply",
    "pipelines.controlnet.model_files",
    "pipelines.controlnet.preprocessors",
    "pipelines.models.checkpoint_loader",
    "pipelines.models.registry",
    "pipelines.postprocess.sd_upscaler",
    "pipelines.postprocess.upscalers",
)


def test_moving_imports_to_module_top_keeps_heavy_libraries_lazy() -> None:
    """The sibling imports at module top must not drag torch, diffusers or PIL in at start-up."""
    script = (
        "import importlib, json, sys\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps([m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *_LIGHT_MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
