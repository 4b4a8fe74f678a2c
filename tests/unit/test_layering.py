"""The package layering (docs/architecture.md): the shared model in `nodemesh`
imports neither side; the node agent and the control plane do not import each
other; only the front door (nodemesh.cli, nodemesh.lab, the install verb)
imports both. Checked on the source's import statements, lazy imports included;
and no two modules share a name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIDES = ("nodeagent", "controlplane")
FRONT_DOOR = ("nodemesh.cli", "nodemesh.lab")
# `nodemesh install` reads an agent config to plan its units (nodemesh/install.py).
FRONT_DOOR_MODULES = ("nodemesh.install",)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts)


def test_shared_model_imports_neither_side() -> None:
    bad = []
    for path in _sources("nodemesh"):
        mod = _module(path)
        if _in(mod, FRONT_DOOR) or mod in FRONT_DOOR_MODULES:
            continue
        bad += [f"{mod} imports {name}" for name in _imports(path) if _top(name) in SIDES]
    assert bad == []


def test_sides_do_not_import_each_other_or_the_front_door() -> None:
    bad = []
    for side, other in (("nodeagent", "controlplane"), ("controlplane", "nodeagent")):
        for path in _sources(side):
            bad += [f"{_module(path)} imports {name}" for name in _imports(path)
                    if _top(name) == other or _in(name, FRONT_DOOR)]
    assert bad == []



def test_module_basenames_are_unique() -> None:
    """One name per idea: no two hand-written modules share a basename (package
    markers aside), so a name says which module is meant."""
    seen: dict[str, list[str]] = {}
    for package in ("nodemesh", "nodeagent", "controlplane"):
        for path in _sources(package):
            if path.name not in ("__init__.py", "__main__.py"):
                seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}



def test_the_cli_turns_grpc_fork_handlers_off_before_grpc_is_imported() -> None:
    """Every nodemesh process starts in the CLI package; the agent forks its proxy workers
    while gRPC is busy, and gRPC's fork handlers in the child can abort the worker. The
    package above the CLI must not import grpc first, or the setting comes too late."""
    import os
    import subprocess
    import sys

    code = ("import sys, os, nodemesh; before = 'grpc' in sys.modules; import nodemesh.cli; "
            "print(before, os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "false"], out
