"""Shared pytest set-up: root-only tiers fail loudly in CI instead of skipping."""

from __future__ import annotations

import os
import shutil

import pytest


def require_root(what: str) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} needs root, and CI runs as root: refusing to skip")
    pytest.skip(f"{what} needs root")


def require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `make setup` (scripts/setup.sh)")
