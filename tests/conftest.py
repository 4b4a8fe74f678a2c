"""Shared test helpers, one of each: what a test needs and does not find skips it
on a developer's machine and fails it in CI (which runs as root with everything
installed: a skip there would hide a broken tier); `wait_until` polls a condition
with a deadline and says what it waited for."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """A test cannot run here: skip locally, fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run every test: refusing to skip)")
    pytest.skip(reason)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{what} needs root")


def require_tool(tool: str, package: str = "") -> str:
    """The tool's path; else skip (fail in CI), naming what installs it."""
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed ({f'Debian package {package}; ' if package else ''}"
                    "`make setup` / scripts/setup.sh installs it)")
    return path


def wait_until(cond: Callable[[], object], timeout: float, what: str, *, interval: float = 0.1,
               tolerate: tuple[type[BaseException], ...] = (),
               diag: Callable[[], str] | None = None) -> None:
    """Poll `cond` until it is true. Exceptions of the `tolerate` types count as
    not yet (the last one is reported); `diag` adds what to look at on a timeout."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if cond():
                return
        except tolerate as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    msg = f"timed out after {timeout:g}s waiting for {what}"
    if last is not None:
        msg += f"; last error: {last!r}"
    if diag is not None:
        msg += f"\n{diag()}"
    raise AssertionError(msg)
