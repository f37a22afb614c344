"""Finding the real binaries the tests drive; a missing one fails the test with the package to install."""

from __future__ import annotations

import shutil

import pytest


def find_binary(package: str, *candidates: str) -> str:
    """The first of `candidates` on PATH (or given as an absolute path); otherwise fail naming the Debian package."""
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    pytest.fail(
        f"none of {', '.join(candidates)} found: install the Debian package {package} "
        f"(apt-get install {package}; `make test` does it when run as root)"
    )


def chromium() -> str:
    """Debian's Chromium headless shell: the engine of Chromium without its browser UI, as Playwright itself runs
    headless. The browser tests take half the CPU with it that they took with the full `chromium` (docs/benchmarks.md,
    section 7)."""
    return find_binary("chromium-headless-shell", "chromium-headless-shell", "/usr/bin/chromium-headless-shell")


def promtool() -> str:
    return find_binary("prometheus", "promtool", "/usr/bin/promtool")
