"""Rendering the Kubernetes overlays with the real `kubectl kustomize`, and reading what it prints."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.binaries import find_binary

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = tuple(sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file()))


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.2 as Kubernetes reads it: kustomize prints `matchType: =` unquoted, which YAML 1.1 (PyYAML) would
    take for its obsolete `value` type instead of the string "="."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


@functools.cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = find_binary("kubectl (or kustomize)", "kubectl")
    done = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return tuple(load_all(done.stdout))


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """Every object `kubectl kustomize` renders for an overlay name (or any kustomization directory), rendered once
    per process: copy an object before changing it."""
    path = Path(overlay) if isinstance(overlay, Path) else KUBERNETES / "overlays" / overlay
    return list(_render(str(path)))
