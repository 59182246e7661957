"""The house rules of docs/architecture.md, read off the code: no import cycle in modalkit/ (deferred imports
included), imports point one way, the library never imports Prefect, and the module map names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import modalkit

ROOT = Path(modalkit.__file__).parent.parent
LIBRARY = ROOT / "modalkit"
#: Modules of modalkit/ that sit beside the CLI, outside the library proper: they may import Prefect and the flows.
CLI_SIDE = {"modalkit.cli", "modalkit.cli_prefect"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports when it runs: at the top or deferred in a function; not under TYPE_CHECKING.

    ``from a import b`` counts as importing ``a.b`` when ``a/b`` is a module, else ``a``.
    """
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _exists(sub) else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIBRARY.rglob("*.py")}


def library_graph() -> dict[str, set[str]]:
    """modalkit module -> the modalkit modules it imports (a package's ``__init__`` is its own node)."""
    modules = library_modules()
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import() -> None:
    # the check below can fail: a two-module loop, one side deferred inside a function, is reported
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

    assert cycles(graph) == [["a", "b"]]


def test_no_import_cycle_in_modalkit_deferred_imports_included() -> None:
    graph = library_graph()

    assert len(graph) > 40
    assert cycles(graph) == []


def test_the_library_never_imports_prefect_the_flows_or_the_tasks() -> None:
    offending = {
        name: sorted(m for m in imported_modules(path) if m.split(".")[0] in ("prefect", "flows", "tasks"))
        for name, path in library_modules().items()
        if name not in CLI_SIDE
    }

    assert {name: found for name, found in offending.items() if found} == {}


def test_imports_point_one_way_routes_never_reach_the_modal_classes_or_the_cli() -> None:
    # fast_api -> runners, never back; the runners know no HTTP route, Modal class or CLI
    rules = {
        "modalkit.runners": ("modalkit.fast_api", "modalkit.modal_service", "modalkit.modal_app", "modalkit.cli"),
        "modalkit.fast_api": ("modalkit.modal_service", "modalkit.modal_app", "modalkit.cli"),
        "modalkit.queues": ("modalkit.batch", "modalkit.runners", "modalkit.fast_api", "modalkit.modal_service"),
    }
    graph = library_graph()
    offending = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for prefix, banned in rules.items()
        if name == prefix or name.startswith(prefix + ".")
        for target in targets
        if any(target == b or target.startswith(b + ".") for b in banned)
    ]

    assert offending == []


def test_the_module_map_names_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    sources = [
        p.relative_to(ROOT).as_posix()
        for folder in ("modalkit", "flows", "tasks")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py" or p.parent == LIBRARY
    ]

    missing = sorted(s for s in sources if s not in named)
    stale = sorted(
        n for n in named if "/" in n and not (ROOT / n).is_file() and n.split("/")[0] in ("modalkit", "flows", "tasks")
    )
    assert missing == []
    assert stale == []
