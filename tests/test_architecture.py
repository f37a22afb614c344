"""The layers of docs/architecture.md hold: every import of every module is one its layer may make, and no
modules import each other around a loop.

The rules are read from the page's table, so the page and this test cannot drift apart. Imports are found with
`ast` (nothing is imported to check them): top-level ones, those inside functions and those under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES = ("bot", "telemetry", "alerts", "dashboards")
_NOTHING = {"—", "-", ""}


@dataclass(frozen=True)
class Layer:
    name: str
    patterns: tuple[str, ...]
    may_import: frozenset[str]


def read_layers(page: str) -> list[Layer]:
    """The rows of the table under "## What may import what"."""
    section = page.split("## What may import what", 1)[1]
    layers = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        name, modules, may_import = cells
        patterns = tuple(re.findall(r"`([^`]+)`", modules))
        allowed = frozenset(x.strip() for x in may_import.split(",") if x.strip() not in _NOTHING)
        layers.append(Layer(name, patterns, allowed))
    return layers


def _specificity(pattern: str, module: str) -> tuple[int, int] | None:
    """How precisely `pattern` names `module` (higher is more precise), or None when it does not."""
    if pattern == module:
        return (1, len(pattern))
    if pattern.endswith(".*") and module.startswith(pattern[:-1]):
        return (0, len(pattern))
    return None


def layer_of(module: str, layers: Iterable[Layer]) -> Layer | None:
    matches = [(score, layer) for layer in layers for p in layer.patterns if (score := _specificity(p, module))]
    return max(matches, key=lambda match: match[0])[1] if matches else None


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every module of our packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Our modules that module `name` imports (`from a import b` counts as `a.b` when that is a module)."""
    known = set(known)
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` of a non-module attribute path: the longest prefix that is one of ours.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def violations(graph: Mapping[str, set[str]], layers: list[Layer]) -> list[str]:
    """Every import a module's layer may not make, and every module no layer names."""
    problems = []
    for module, targets in sorted(graph.items()):
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module} belongs to no layer of docs/architecture.md")
            continue
        for target in sorted(targets):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs.name != own.name and theirs.name not in own.may_import:
                problems.append(f"{module} ({own.name}) imports {target} ({theirs.name})")
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other around a loop (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


LAYERS = read_layers(PAGE.read_text(encoding="utf-8"))


def test_the_page_names_layers_that_point_one_way() -> None:
    names = {layer.name for layer in LAYERS}
    assert {"telemetry", "store", "bot core", "demo", "entry points", "generators"} <= names
    for layer in LAYERS:
        assert layer.patterns, f"layer {layer.name} names no modules"
        assert layer.may_import <= names, f"layer {layer.name} may import an unknown layer"
    allowed = {layer.name: layer.may_import for layer in LAYERS}
    assert cycles(allowed) == [], "the layers' may-import relation has a loop"
    assert next(layer for layer in LAYERS if layer.name == "telemetry").may_import == frozenset()


def test_every_module_imports_only_what_its_layer_may() -> None:
    graph = import_graph()
    assert "bot.deadline" in graph and "telemetry.tracing" in graph  # the scan found the code
    assert violations(graph, LAYERS) == []


def test_no_modules_import_each_other() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_wrong_import_and_a_loop() -> None:
    """The checks themselves, on made-up graphs: telemetry reaching into the bot, and a two-module loop."""
    bad = {"telemetry.tracing": {"bot.settings"}, "bot.settings": set(), "bot.store.base": {"bot.deadline"}}
    assert violations(bad, LAYERS) == [
        "bot.store.base (store) imports bot.deadline (bot core)",
        "telemetry.tracing (telemetry) imports bot.settings (bot foundations)",
    ]
    assert violations({"elsewhere": set()}, LAYERS) == ["elsewhere belongs to no layer of docs/architecture.md"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("bot.store.sqlite", LAYERS).name == "store"
    assert layer_of("bot.app", LAYERS).name == "entry points"
    assert layer_of("bot.replies", LAYERS).name == "bot core"


def test_imports_are_found_in_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for name in ("a", "b", "c", "d"):
        (tmp_path / "pkg" / f"{name}.py").write_text("")
    source = (
        "from typing import TYPE_CHECKING\n"
        "from pkg import a\n"
        "if TYPE_CHECKING:\n    from pkg.b import Thing\n"
        "def f():\n    import pkg.c.attribute\n"
        "from . import d\n"
    )
    (tmp_path / "pkg" / "user.py").write_text(source)
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.user"}
    assert imports_of("pkg.user", tmp_path / "pkg" / "user.py", known) == {"pkg.a", "pkg.b", "pkg.c", "pkg.d"}
