"""uv.lock is the install: it matches pyproject.toml, pins every package with hashes, and covers every import.

Offline and fast: the lock and pyproject.toml are compared as files (what `uv sync --locked` in `make install` also
refuses to install past), and imports are matched against the distributions installed in this environment.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections import defaultdict
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT_NAME = PYPROJECT["project"]["name"]


@cache
def _lock() -> dict[str, Any]:
    """uv.lock, parsed when a test first needs it: not at import, which every pytest-xdist worker does (a quarter of
    a second of tomllib each)."""
    return tomllib.loads((ROOT / "uv.lock").read_text())


# What ships (its imports must be runtime dependencies) and what only develops it (dev extra allowed too).
RUNTIME_CODE = ("bot", "telemetry")
DEV_CODE = ("alerts", "dashboards", "bench", "tests")

Requirement_ = tuple[str, frozenset[str], SpecifierSet, str]


def _key(requirement: Requirement, extra: str | None) -> Requirement_:
    markers = [str(requirement.marker)] if requirement.marker else []
    if extra:
        markers.append(f"extra == '{extra}'")
    marker = str(Marker(" and ".join(markers))) if markers else ""
    return (canonicalize_name(requirement.name), frozenset(requirement.extras), requirement.specifier, marker)


def _pyproject_requirements() -> set[Requirement_]:
    project = PYPROJECT["project"]
    wanted = {_key(Requirement(text), None) for text in project["dependencies"]}
    for extra, texts in project.get("optional-dependencies", {}).items():
        wanted |= {_key(Requirement(text), extra) for text in texts}
    return wanted


def _locked_root() -> dict:
    (root,) = [package for package in _lock()["package"] if package["name"] == PROJECT_NAME]
    return root


def _locked_requirement(entry: dict) -> Requirement:
    text = entry["name"]
    if entry.get("extras"):
        text += f"[{','.join(entry['extras'])}]"
    text += entry.get("specifier", "")
    if entry.get("marker"):
        text += f"; {entry['marker']}"
    return Requirement(text)


def _declared(group: str) -> set[str]:
    """Distribution names in [project] dependencies ("dependencies") or an optional-dependencies extra."""
    project = PYPROJECT["project"]
    texts = project["dependencies"] if group == "dependencies" else project["optional-dependencies"][group]
    return {canonicalize_name(Requirement(text).name) for text in texts}


def test_the_lock_was_made_from_this_pyproject() -> None:
    root = _locked_root()
    locked = {_key(_locked_requirement(entry), None) for entry in root["metadata"]["requires-dist"]}
    wanted = _pyproject_requirements()
    assert sorted(map(repr, wanted - locked)) == [], "in pyproject.toml, not in uv.lock: run `make lock`"
    assert sorted(map(repr, locked - wanted)) == [], "in uv.lock, not in pyproject.toml: run `make lock`"
    assert sorted(root["metadata"].get("provides-extras", [])) == sorted(PYPROJECT["project"]["optional-dependencies"])
    assert _lock()["requires-python"] == PYPROJECT["project"]["requires-python"]
    assert root["source"] == {"editable": "."}


def test_every_locked_package_is_pinned_from_pypi_with_hashes() -> None:
    packages = [package for package in _lock()["package"] if package["name"] != PROJECT_NAME]
    assert len(packages) > 50  # the whole tree, not only the direct dependencies
    unhashed = []
    for package in packages:
        assert package["source"] == {"registry": "https://pypi.org/simple"}, package["name"]
        assert package.get("version"), package["name"]
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files, package["name"]
        unhashed += [f"{package['name']}: {file['url']}" for file in files if not file["hash"].startswith("sha256:")]
    assert unhashed == []


def test_the_uv_that_make_runs_is_pinned_with_hashes() -> None:
    text = (ROOT / "tools/uv-requirements.txt").read_text()
    requirements = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert len(requirements) == 1 and re.fullmatch(r"uv==[\d.]+ \\", requirements[0]), requirements
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) >= 10  # one per platform's wheel, and the sdist


@cache
def _modules_of_installed_distributions() -> dict[str, set[str]]:
    """Dotted module name -> the distributions whose files hold it (namespace packages such as `opentelemetry`
    are split over many, so imports are matched down to the module, not the top-level name)."""
    owners: dict[str, set[str]] = defaultdict(set)
    for distribution in metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        for file in distribution.files or ():
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or ".." in parts:
                continue
            stem, _, suffix = parts[-1].partition(".")
            if suffix not in ("py", "pyi") and not suffix.endswith(("so", "pyd")):
                continue
            module = [*parts[:-1], stem] if stem != "__init__" else list(parts[:-1])
            if module:
                owners[".".join(module)].add(name)
    return owners


@cache
def _imports(directory: str) -> set[str]:
    """Every absolute import in the directory's Python files; for `from a import b`, `a.b` (b may be a module)."""
    found: set[str] = set()
    for path in (ROOT / directory).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _is_first_party_or_stdlib(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file()


def _owners(module: str, owners: dict[str, set[str]]) -> set[str]:
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        if found := owners.get(".".join(parts[:length])):
            return found
    return set()


def _undeclared_imports(runtime: set[str], dev: set[str]) -> list[str]:
    owners = _modules_of_installed_distributions()
    undeclared = []
    for directories, declared in ((RUNTIME_CODE, runtime), (DEV_CODE, runtime | dev)):
        for directory in directories:
            for module in sorted(_imports(directory)):
                if _is_first_party_or_stdlib(module):
                    continue
                distributions = _owners(module, owners)
                if not distributions & declared:
                    undeclared.append(f"{directory}/ imports {module} (from {sorted(distributions) or 'nothing'})")
    return undeclared


def test_every_package_the_code_imports_is_declared() -> None:
    assert _undeclared_imports(_declared("dependencies"), _declared("dev")) == []


def test_the_import_check_finds_a_package_that_only_comes_with_another() -> None:
    # httpx2 is installed (openai needs it) but bot/ imports it directly: without its own line it must be reported.
    undeclared = _undeclared_imports(_declared("dependencies") - {"httpx2"}, _declared("dev"))
    assert "bot/ imports httpx2 (from ['httpx2'])" in undeclared
    # A dev-only package is not enough for the code that ships.
    assert _undeclared_imports(_declared("dependencies") - {"aiohttp"}, _declared("dev") | {"aiohttp"})


def test_imports_are_matched_to_the_module_not_the_namespace() -> None:
    owners = _modules_of_installed_distributions()
    assert _owners("opentelemetry.sdk.trace.ReadableSpan", owners) == {"opentelemetry-sdk"}
    assert _owners("opentelemetry.trace.SpanKind", owners) == {"opentelemetry-api"}
    assert _owners("opentelemetry.proto.collector.trace.v1.trace_service_pb2", owners) == {"opentelemetry-proto"}
    assert _owners("yaml", owners) == {"pyyaml"}
