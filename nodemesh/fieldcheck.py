"""The one field validator for everything nodemesh reads from a user or a peer:
config documents (model, routespec, security, rollouts, healthcheckspec), the
agent's config file (nodeagent/config.py) and the metadata of xDS resources
(nodeagent/xds/convert.py).

Each problem is (path, reason): the path names the object and the field
(`Service default/web: spec.ports[0].port`), the reason says what is wrong
and what would be right. A checker either collects every problem of a document
(the config API reports them all at once), or, given `fail`, stops at the
first one by raising whatever `fail` raises (the agent's config error, an xDS
NACK)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar, overload

Problem = tuple[str, str]  # (path, reason); the path names the object and the field

_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    """The YAML name of a value's type, for 'must be a mapping, got list'."""
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and not _LABEL_PREFIX.match(prefix):
        return False
    return bool(name) and len(name) <= 63 and bool(_LABEL_NAME.match(name))


def parse_duration(text: str) -> float | None:
    """'250ms', '5s', '1m', '1h' -> seconds; None if it is not such a duration."""
    m = DURATION.match(text)
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)] if m else None


class FieldChecker:
    """Checks the fields of one object under a subject like 'Service default/web'.
    Every method returns a usable value (the default, or an empty one) after a
    problem, so parsing goes on and finds the next."""

    def __init__(self, subject: str = "", fail: Callable[[str, str], NoReturn] | None = None) -> None:
        self.subject = subject
        self.problems: list[Problem] = []
        self._fail = fail

    def add(self, path: str, reason: str) -> None:
        full = f"{self.subject}: {path}" if self.subject and path else (self.subject or path)
        if self._fail is not None:
            self._fail(full, reason)
        self.problems.append((full, reason))

    # ------------------------------------------------------------- containers

    def mapping(self, value: Any, path: str, allowed: Sequence[str],
                required: bool = False) -> dict[str, Any] | None:
        """A mapping whose keys are all in `allowed`: {} when absent, None when it
        is something else (the caller stops there rather than report its fields)."""
        if value is None:
            if required:
                self.add(path, "required")
            return {}
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {type_name(value)}")
            return None
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                self.add(join(path, str(k)), f"unknown field; allowed: {', '.join(allowed)}")
        return value

    def entries(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(path, f"must be a list, got {type_name(value)}")
            return []
        return value

    # ------------------------------------------------------------- scalars

    def text(self, value: Any, path: str, required: bool = False) -> str:
        if value is None or value == "":
            if required:
                self.add(path, "required; must not be empty")
            return ""
        if not isinstance(value, str):
            self.add(path, f"must be a string, got {type_name(value)}")
            return ""
        return value

    def one_of(self, value: Any, path: str, choices: Sequence[str], default: str) -> str:
        if value is None:
            return default
        s = self.text(value, path)
        if s not in choices:
            self.add(path, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return s

    def integer(self, value: Any, path: str, lo: int, hi: int, default: int) -> int:
        if value is None:
            return default
        # bool is an int in Python; `true` where a number belongs is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.add(path, f"must be an integer in {lo}..{hi}, got {value!r}")
            return default
        return value

    def port(self, value: Any, path: str) -> int:
        """A required port number."""
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            self.add(path, "must be an integer in 1..65535")
            return 0
        return value

    def number(self, value: Any, path: str, lo: float, hi: float, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            self.add(path, f"must be a number in {lo:g}..{hi:g}, got {value!r}")
            return default
        return float(value)

    def flag(self, value: Any, path: str, default: bool = False) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.add(path, f"must be true or false, got {type_name(value)}")
            return default
        return value

    def duration(self, value: Any, path: str, default: float = 0.0, lo: float = 0.0,
                 hi: float = math.inf) -> float:
        """Seconds from '250ms', '5s', '1m' or '1h', within lo..hi seconds."""
        if value is None:
            return default
        seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None:
            self.add(path, "must be a duration like '250ms', '5s', '1m' or '1h'")
            return default
        if not lo <= seconds <= hi:
            self.add(path, f"must be between {lo:g}s and {hi:g}s")
            return default
        return seconds

    def regex(self, value: str, path: str) -> None:
        try:
            re.compile(value)
        except re.error as e:
            self.add(path, f"not a valid regular expression: {e}")

    def header_name(self, value: Any, path: str) -> str:
        s = self.text(value, path, required=True)
        if s and not _HEADER_NAME.match(s):
            self.add(path, f"{s!r} is not a valid HTTP header name")
        return s.lower()

    def label_value(self, value: str, path: str) -> str:
        if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
            self.add(path, f"{value!r} is not a valid label value (up to 63 of [A-Za-z0-9._-], starting and "
                     "ending alphanumeric)")
            return ""
        return value

    def labels(self, value: Any, path: str, allow_empty: bool = True) -> tuple[tuple[str, str], ...]:
        """Kubernetes-style labels, sorted (key, value) pairs."""
        if value is None:
            if not allow_empty:
                self.add(path, "required; must map at least one label to a value")
            return ()
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping of label to value, got {type_name(value)}")
            return ()
        if not value and not allow_empty:
            self.add(path, "must map at least one label to a value")
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            kpath = join(path, str(k))
            if not isinstance(k, str) or not valid_label_key(k):
                self.add(kpath, "invalid label key (optional DNS prefix and '/', then up to 63 of "
                         "[A-Za-z0-9._-] starting and ending alphanumeric)")
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                self.add(kpath, f"label value must be a string, got {type_name(v)}")
                continue
            sv = str(v)
            if len(sv) > 63 or not _LABEL_NAME.match(sv):
                self.add(kpath, "invalid label value (up to 63 of [A-Za-z0-9._-], starting and ending alphanumeric)")
                continue
            out.append((k, sv))
        return tuple(sorted(out))


T = TypeVar("T")


class Fields:
    """Reads one mapping field by field, each through a check `(value, path) -> T`;
    `done()` then reports every key nobody asked for as an unknown field. For
    readers that learn the allowed keys as they go (the agent config)."""

    def __init__(self, checker: FieldChecker, raw: Any, path: str) -> None:
        self.checker = checker
        self.path = path
        self.seen: set[str] = set()
        self.raw: Mapping[str, Any] = {}
        if raw is not None and not isinstance(raw, Mapping):
            checker.add(path, f"must be a mapping, got {type_name(raw)}")
        elif raw is not None:
            self.raw = raw

    def sub(self, key: str) -> str:
        return join(self.path, key)

    @overload
    def get(self, key: str, check: Callable[[Any, str], T], default: T) -> T: ...
    @overload
    def get(self, key: str, check: Callable[[Any, str], T], default: None = None) -> T | None: ...

    def get(self, key: str, check: Callable[[Any, str], T], default: T | None = None) -> T | None:
        """An optional field: `default` when absent or null."""
        self.seen.add(key)
        if self.raw.get(key) is None:
            return default
        return check(self.raw[key], self.sub(key))

    def need(self, key: str, check: Callable[[Any, str], T]) -> T:
        """A required field. Only a fail-fast checker reads required fields this
        way: a collecting one would have no value to go on with."""
        self.seen.add(key)
        if self.raw.get(key) is None:
            self.checker.add(self.sub(key), "required")
            raise TypeError(f"Fields.need({key!r}) with a collecting FieldChecker")
        return check(self.raw[key], self.sub(key))

    def done(self) -> None:
        for key in self.raw:
            if key not in self.seen:
                self.checker.add(self.sub(str(key)), f"unknown field; allowed: {', '.join(sorted(self.seen))}")
