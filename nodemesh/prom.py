"""A small Prometheus registry shared by the agent and the control plane:
counters, gauges and histograms with label sets, merging of collections from
several processes, and the text exposition format (render and parse).

Collected data (FamilyData) is plain tuples and dicts, so it pickles cheaply
across the proxy workers' control channel and merges without the family objects.
Each family refuses new series past `max_series` (bounded cardinality), counting
what it dropped in `nodemesh_metrics_series_dropped_total`.

Kept instead of prometheus-client for a measured reason (bench/prom_registry.py,
docs/observability.md): its multiprocess mode scrapes 9-10x slower over the
workers' mmap files, has no series bound, and needs dead workers' files cleaned.
"""

from __future__ import annotations

import math
import re
import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
MergeMode = Literal["sum", "max"]
LabelKey = tuple[str, ...]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DEFAULT_MAX_SERIES = 5000

# Istio's default buckets (milliseconds, and bytes).
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
)
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10 ** i) for i in range(10))


class MetricError(ValueError):
    """A metric defined or used wrongly (a programming error, named precisely)."""


@dataclass(frozen=True)
class FamilyData:
    """One family's collected state: plain data that pickles and merges.
    For counters/gauges `series` maps label values to a float; for histograms to
    (bucket counts (non-cumulative, one per bound plus +Inf), sum, count)."""

    name: str
    help: str
    kind: Kind
    labelnames: LabelKey
    buckets: tuple[float, ...]
    merge: MergeMode
    series: Mapping[LabelKey, Any]


class Family:
    """One metric name with a fixed set of label names."""

    def __init__(self, name: str, help: str, kind: Kind, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float] = (), merge: MergeMode = "sum",
                 max_series: int = DEFAULT_MAX_SERIES, registry: Registry | None = None) -> None:
        if not _NAME_RE.match(name):
            raise MetricError(f"metric name {name!r} is not a valid Prometheus name")
        for ln in labelnames:
            if not _LABEL_RE.match(ln) or ln.startswith("__") or ln == "le":
                raise MetricError(f"metric {name}: label name {ln!r} is not allowed")
        if kind == "histogram":
            b = sorted(float(x) for x in buckets)
            if not b:
                raise MetricError(f"histogram {name} needs at least one bucket bound")
            buckets = tuple(b)
        self.name = name
        self.help = help
        self.kind: Kind = kind
        self.labelnames: LabelKey = tuple(labelnames)
        self.buckets: tuple[float, ...] = tuple(buckets)
        self.merge_mode: MergeMode = merge
        self.max_series = max_series
        self._registry = registry
        self._values: dict[LabelKey, Any] = {}
        self._lock = threading.Lock()  # the admin thread may read while the loop writes

    def _key(self, labels: Mapping[str, object]) -> LabelKey | None:
        if len(labels) != len(self.labelnames) or any(ln not in labels for ln in self.labelnames):
            extra = sorted(set(labels) - set(self.labelnames))
            missing = sorted(set(self.labelnames) - set(labels))
            raise MetricError(f"metric {self.name}: labels must be exactly {list(self.labelnames)}"
                              f" (missing {missing}, unexpected {extra})")
        key = tuple(str(labels[ln]) for ln in self.labelnames)
        if key not in self._values and len(self._values) >= self.max_series:
            if self._registry is not None and self is not self._registry.dropped:
                self._registry.dropped.inc({"metric": self.name})
            return None  # bounded cardinality: refuse the new series rather than grow without end
        return key

    def child(self, labels: Mapping[str, object]) -> Child | None:
        """The series for these labels, resolved once: a hot path keeps the child
        (per route and endpoint, say) and skips label handling per update. None
        when the family is at its series limit (the update is dropped, as inc() does)."""
        with self._lock:
            key = self._key(labels)
        return None if key is None else Child(self, key)

    def inc(self, labels: Mapping[str, object] | None = None, value: float = 1.0) -> None:
        if self.kind == "histogram":
            raise MetricError(f"metric {self.name} is a histogram: use observe()")
        if self.kind == "counter" and value < 0:
            raise MetricError(f"counter {self.name} cannot decrease (inc by {value})")
        with self._lock:
            key = self._key(labels or {})
            if key is not None:
                self._values[key] = self._values.get(key, 0.0) + value

    def set(self, labels: Mapping[str, object] | None = None, value: float = 0.0) -> None:
        if self.kind != "gauge":
            raise MetricError(f"metric {self.name} is a {self.kind}: only gauges can be set")
        with self._lock:
            key = self._key(labels or {})
            if key is not None:
                self._values[key] = float(value)

    def set_total(self, labels: Mapping[str, object] | None = None, value: float = 0.0) -> None:
        """A counter mirrored from a cumulative count kept elsewhere (a kernel map,
        a monitor's tally). A lower value is a reset of that source (a reloaded BPF
        program), which Prometheus' rate() already understands."""
        if self.kind != "counter":
            raise MetricError(f"metric {self.name} is a {self.kind}: set_total() is for counters")
        if value < 0:
            raise MetricError(f"counter {self.name} cannot be negative ({value})")
        with self._lock:
            key = self._key(labels or {})
            if key is not None:
                self._values[key] = float(value)

    def observe(self, labels: Mapping[str, object] | None = None, value: float = 0.0) -> None:
        if self.kind != "histogram":
            raise MetricError(f"metric {self.name} is a {self.kind}: observe() is for histograms")
        with self._lock:
            key = self._key(labels or {})
            if key is None:
                return
            h = self._values.get(key)
            if h is None:
                h = self._values[key] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            i = 0
            while i < len(self.buckets) and value > self.buckets[i]:
                i += 1
            h[0][i] += 1
            h[1] += value
            h[2] += 1

    def remove(self, labels: Mapping[str, object]) -> None:
        with self._lock:
            self._values.pop(tuple(str(labels.get(ln, "")) for ln in self.labelnames), None)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def value(self, labels: Mapping[str, object] | None = None) -> Any:
        """The current value of one series (tests, the CLI); 0 when absent."""
        key = tuple(str((labels or {}).get(ln, "")) for ln in self.labelnames)
        v = self._values.get(key)
        if v is None:
            return 0.0
        return v if self.kind != "histogram" else (list(v[0]), v[1], v[2])

    def collect(self) -> FamilyData:
        with self._lock:
            if self.kind == "histogram":
                series = {k: (tuple(v[0]), v[1], v[2]) for k, v in self._values.items()}
            else:
                series = dict(self._values)
        return FamilyData(self.name, self.help, self.kind, self.labelnames, self.buckets, self.merge_mode, series)


class Child:
    """One resolved series of a family (Family.child). Updates stay correct after the
    family is cleared (the series comes back), as label-based updates would."""

    __slots__ = ("_family", "_key")

    def __init__(self, family: Family, key: LabelKey) -> None:
        self._family = family
        self._key = key

    def inc(self, value: float = 1.0) -> None:
        f = self._family
        with f._lock:
            f._values[self._key] = f._values.get(self._key, 0.0) + value

    def observe(self, value: float) -> None:
        f = self._family
        with f._lock:
            h = f._values.get(self._key)
            if h is None:
                h = f._values[self._key] = [[0] * (len(f.buckets) + 1), 0.0, 0]
            h[0][bisect_left(f.buckets, value)] += 1
            h[1] += value
            h[2] += 1


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self.dropped = Family("nodemesh_metrics_series_dropped_total",
                              "New label sets refused because a metric reached its series limit.",
                              "counter", ("metric",), registry=self)
        self._families[self.dropped.name] = self.dropped

    def _get(self, name: str, help: str, kind: Kind, labelnames: Sequence[str], **kw: Any) -> Family:
        fam = self._families.get(name)
        if fam is not None:
            if fam.kind != kind or fam.labelnames != tuple(labelnames):
                raise MetricError(f"metric {name} is already defined as a {fam.kind} with labels "
                                  f"{list(fam.labelnames)}")
            return fam
        fam = self._families[name] = Family(name, help, kind, labelnames, registry=self, **kw)
        return fam

    def counter(self, name: str, help: str, labelnames: Sequence[str] = (), **kw: Any) -> Family:
        return self._get(name, help, "counter", labelnames, **kw)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = (), **kw: Any) -> Family:
        return self._get(name, help, "gauge", labelnames, **kw)

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (), *,
                  buckets: Sequence[float], **kw: Any) -> Family:
        return self._get(name, help, "histogram", labelnames, buckets=buckets, **kw)

    def family(self, name: str) -> Family | None:
        return self._families.get(name)

    def collect(self) -> list[FamilyData]:
        return [f.collect() for f in self._families.values()]

    def reset(self) -> None:
        """Forget every value (tests)."""
        for f in self._families.values():
            f.clear()


def merge(parts: Iterable[Iterable[FamilyData]]) -> list[FamilyData]:
    """Merge collections from several processes: counters and histograms add up;
    gauges add up or take the maximum as the family says."""
    out: dict[str, FamilyData] = {}
    acc: dict[str, dict[LabelKey, Any]] = {}
    for part in parts:
        for fd in part:
            first = out.get(fd.name)
            if first is None:
                out[fd.name] = fd
                acc[fd.name] = {}
            elif first.kind != fd.kind or first.labelnames != fd.labelnames or first.buckets != fd.buckets:
                raise MetricError(f"metric {fd.name} differs between processes "
                                  f"({first.kind} {list(first.labelnames)} vs {fd.kind} {list(fd.labelnames)})")
            series = acc[fd.name]
            for key, v in fd.series.items():
                old = series.get(key)
                if old is None:
                    series[key] = v
                elif fd.kind == "histogram":
                    counts = tuple(a + b for a, b in zip(old[0], v[0], strict=True))
                    series[key] = (counts, old[1] + v[1], old[2] + v[2])
                elif fd.kind == "gauge" and fd.merge == "max":
                    series[key] = max(old, v)
                else:
                    series[key] = old + v
    return [replace(fd, series=acc[name]) for name, fd in out.items()]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def render(families: Iterable[FamilyData]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for fd in sorted(families, key=lambda f: f.name):
        help_text = fd.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {fd.name} {help_text}")
        lines.append(f"# TYPE {fd.name} {fd.kind}")
        for key in sorted(fd.series):
            v = fd.series[key]
            if fd.kind == "histogram":
                counts, total, n = v
                cum = 0
                for bound, c in zip((*fd.buckets, math.inf), counts, strict=True):
                    cum += c
                    le = 'le="' + _fmt(bound) + '"'
                    lines.append(f"{fd.name}_bucket{_labels(fd.labelnames, key, le)} {cum}")
                lines.append(f"{fd.name}_sum{_labels(fd.labelnames, key)} {_fmt(total)}")
                lines.append(f"{fd.name}_count{_labels(fd.labelnames, key)} {n}")
            else:
                lines.append(f"{fd.name}{_labels(fd.labelnames, key)} {_fmt(v)}")
    return "\n".join(lines) + "\n"


_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
_PAIR_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, frozenset[tuple[str, str]], float]


def parse(text: str) -> list[Sample]:
    """Parse exposition text into (name, labels, value) samples (tests, the CLI)."""
    out: list[Sample] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            raise MetricError(f"line {n} is not a Prometheus sample: {line[:120]!r}")
        labels = frozenset(
            (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for k, v in _PAIR_RE.findall(m.group(3) or "")
        )
        out.append((m.group(1), labels, float(m.group(4))))
    return out


def select(samples: Iterable[Sample], name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    """Samples of `name` whose labels include every `match` pair."""
    res = []
    for sname, labels, v in samples:
        if sname != name:
            continue
        d = dict(labels)
        if all(d.get(k) == want for k, want in match.items()):
            res.append((d, v))
    return res


def histogram_quantile(buckets: tuple[float, ...] | list[float], counts: list[float], q: float) -> float:
    """Prometheus-style histogram_quantile over non-cumulative bucket counts (the
    last count is the +Inf bucket): linear within the bucket holding the rank."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    cum = 0.0
    lower = 0.0
    for bound, c in zip((*buckets, float("inf")), counts, strict=True):
        if cum + c >= rank and c > 0:
            if bound == float("inf"):
                return lower
            return float(lower + (bound - lower) * ((rank - cum) / c))
        cum += c
        lower = bound if bound != float("inf") else lower
    return lower
