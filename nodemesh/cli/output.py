"""The CLI's one output layer: tables, `-o table|json|yaml`, and errors that say
what went wrong and what to check, plus the flags every verb shares. Every verb
module prints through here; `run()` is the one place a failure becomes an
`error:` line and an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc
import yaml

from controlplane.apiclient import ClientError, add_credential_flags, default_server

OUTPUTS = ("table", "json", "yaml")


class CommandError(Exception):
    """A failure the operator can act on: the message says what went wrong, the
    hint what to check; `code` is the exit status (2: the command line itself)."""

    def __init__(self, message: str, hint: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """--server and the operator credential flags (docs/security.md)."""
    p.add_argument("--server", default=None, help="control plane address, unix:/path or host:port "
                                                  f"(default: $NODEMESH_SERVER or {default_server()})")
    add_credential_flags(p)  # --token-file --ca-file --cert --key


def add_output_flag(p: argparse.ArgumentParser, choices: Sequence[str] = OUTPUTS, default: str = "table") -> None:
    p.add_argument("-o", "--output", choices=tuple(choices), default=default,
                   help=f"output format (default {default})")


def add_output_flags_with_json(p: argparse.ArgumentParser) -> None:
    """-o table|json|yaml, and --json (the older spelling of -o json, kept for scripts)."""
    add_output_flag(p)
    p.add_argument("--json", dest="output", action="store_const", const="json", help="the same as -o json")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns; an empty or None cell prints as '-'. The last column is not padded."""
    cells = [[("-" if c is None or c == "" else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def render(obj: Any, output: str, human: Callable[[Any], str] | None = None) -> str:
    """`obj` as JSON, YAML or (table) what `human` makes of it; ends with one newline."""
    if output == "json":
        text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    elif output == "yaml":
        text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
    elif human is not None:
        text = human(obj)
    else:
        raise ValueError(f"output {output!r} needs a human-readable view")
    return text.rstrip("\n") + "\n"


def emit(obj: Any, output: str, human: Callable[[Any], str] | None = None, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(render(obj, output, human))
    out.flush()


def emit_all(docs: Sequence[Any], output: str, human: Callable[[Any], str] | None = None) -> None:
    """Several documents: a JSON list, a YAML stream (---), or the table."""
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump_all(list(docs), sort_keys=False))
        sys.stdout.flush()
    else:
        emit(list(docs), output, human)


# What to check when the control plane refuses (ClientError already says what to
# check when it cannot be reached at all).
_CLIENT_HINTS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "is the control plane overloaded or unreachable from here (firewall, "
                                       "--server)?",
    grpc.StatusCode.UNAUTHENTICATED: "give an operator credential: --token-file, or --cert/--key "
                                     "(`nodemesh operator create`, docs/security.md)",
    grpc.StatusCode.PERMISSION_DENIED: "this operator's role does not allow it (docs/security.md, roles)",
}


def client_hint(e: ClientError) -> str:
    return _CLIENT_HINTS.get(e.code, "") if e.code is not None else ""


def error(message: str, hint: str = "") -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"  check: {hint}", file=sys.stderr)


def run(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run one command; known failures become `error: ...` (and `check: ...`) on stderr."""
    try:
        return int(func(args) or 0)
    except CommandError as e:
        error(str(e), e.hint)
        return e.code
    except ClientError as e:
        error(str(e), client_hint(e))
        return 1
    except KeyboardInterrupt:
        return 130
