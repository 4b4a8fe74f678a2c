"""Identity bindings: which service accounts, workload labels and addresses the
operator allows on which nodes (MeshConfig spec.identityBindings).

The control plane never takes a node's word for what it runs: a registration
is accepted, and an SVID signed, only for what a binding matching the node
allows. Anything not bound is refused (default deny). A binding matches a node
by name (`nodes`, '*' as a wildcard inside a name) and/or by the labels the
operator set for the node when making its join token (`nodeSelector`); the
node cannot choose either.

    identityBindings:
    - name: web                         # named in refusals
      nodes: [node-2]                   # or ["*"], or ["edge-*"]
      nodeSelector: {role: web}         # labels from `nodemesh token create --label`
      serviceAccounts: [default/web]    # "<namespace>/<sa>", either part may be '*'
      workloadLabels: {app: [web]}      # allowed label values per key; '*' = any (key or value)
      addresses: [10.1.2.0/24]          # more addresses these nodes own (beyond their join address)

`nodeServiceAccounts` (node or '*' -> service accounts) is the older shorthand:
each entry is a binding for that node with any workload labels.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodemesh.security import _cidr_ok, _strings

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_NODE_PATTERN = re.compile(r"^[a-z0-9*]([-a-z0-9.*]{0,251}[a-z0-9*])?$")
_SA_PATTERN = re.compile(r"^(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)/(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$")
_LABEL_KEY = re.compile(r"^(\*|([a-z0-9A-Z]([-a-z0-9A-Z_.]{0,251}/)?)?[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,61}[a-zA-Z0-9])?)$")
MAX_BINDINGS = 1000


@dataclass(frozen=True)
class IdentityBinding:
    name: str
    nodes: tuple[str, ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()
    service_accounts: tuple[str, ...] = ()
    # label key (or '*') -> allowed values (or ('*',))
    workload_labels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    addresses: tuple[str, ...] = ()  # CIDRs

    def matches_node(self, node: str, node_labels: Mapping[str, str]) -> bool:
        if self.nodes and not any(fnmatch.fnmatchcase(node, p) for p in self.nodes):
            return False
        return all(node_labels.get(k) == v for k, v in self.node_selector)

    def binds(self, namespace: str, service_account: str) -> bool:
        for p in self.service_accounts:
            pns, _, psa = p.partition("/")
            if pns in ("*", namespace) and psa in ("*", service_account):
                return True
        return False

    def label_refused(self, labels: Mapping[str, str]) -> str:
        """'' when every label is allowed, else the first one that is not."""
        table = dict(self.workload_labels)
        for k, v in sorted(labels.items()):
            allowed = table.get(k, table.get("*"))
            if allowed is None or ("*" not in allowed and v not in allowed):
                return f"{k}={v}"
        return ""

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.nodes:
            out["nodes"] = list(self.nodes)
        if self.node_selector:
            out["nodeSelector"] = dict(self.node_selector)
        out["serviceAccounts"] = list(self.service_accounts)
        if self.workload_labels:
            out["workloadLabels"] = {k: list(v) for k, v in self.workload_labels}
        if self.addresses:
            out["addresses"] = list(self.addresses)
        return out


def parse_bindings(c: Any, raw: Any, legacy: Iterable[tuple[str, tuple[str, ...]]] = ()) -> tuple[IdentityBinding, ...]:
    """Validate spec.identityBindings (c is the model's checker: c.add(path, why))."""
    out: list[IdentityBinding] = []
    if raw is not None and not isinstance(raw, list):
        c.add("spec.identityBindings", "must be a list of bindings ({name, nodes or nodeSelector, "
              "serviceAccounts, workloadLabels, addresses})")
        raw = []
    seen: set[str] = set()
    for i, b in enumerate(raw or ()):
        path = f"spec.identityBindings[{i}]"
        if i >= MAX_BINDINGS:
            c.add(path, f"at most {MAX_BINDINGS} bindings")
            break
        if not isinstance(b, dict):
            c.add(path, "must be a mapping")
            continue
        unknown = sorted(set(b) - {"name", "nodes", "nodeSelector", "serviceAccounts", "workloadLabels",
                                   "addresses"})
        for k in unknown:
            c.add(f"{path}.{k}", "unknown field (name, nodes, nodeSelector, serviceAccounts, workloadLabels, "
                  "addresses)")
        name = b.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            c.add(f"{path}.name", "must be a name (lower-case letters, digits, '-', '.')")
            name = f"#{i}"
        elif name in seen:
            c.add(f"{path}.name", f"binding {name!r} is listed twice")
        seen.add(name)
        nodes = _strings(c, b.get("nodes"), f"{path}.nodes", lambda v: "" if _NODE_PATTERN.match(v) else
                          "must be a node name, '*' matching any characters")
        sel_raw = b.get("nodeSelector")
        selector: list[tuple[str, str]] = []
        if sel_raw is not None:
            if not isinstance(sel_raw, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in sel_raw.items()):
                c.add(f"{path}.nodeSelector", "must map label names to values (strings)")
            else:
                selector = sorted(sel_raw.items())
        if not nodes and not selector:
            c.add(path, "needs nodes or nodeSelector (use nodes: ['*'] to bind on every node)")
        sas = _strings(c, b.get("serviceAccounts"), f"{path}.serviceAccounts",
                        lambda v: "" if _SA_PATTERN.match(v) else
                        "must be '<namespace>/<service account>', either part may be '*'")
        if not sas:
            c.add(f"{path}.serviceAccounts", "must list at least one '<namespace>/<service account>'")
        wl_raw = b.get("workloadLabels")
        wl: list[tuple[str, tuple[str, ...]]] = []
        if wl_raw is not None:
            if not isinstance(wl_raw, dict):
                c.add(f"{path}.workloadLabels", "must map a label name (or '*') to a list of allowed values")
            else:
                for k, vals in wl_raw.items():
                    kpath = f"{path}.workloadLabels.{k}"
                    if not isinstance(k, str) or not _LABEL_KEY.match(k):
                        c.add(kpath, "the key must be a label name or '*'")
                        continue
                    if isinstance(vals, str):
                        vals = [vals]
                    items = _strings(c, vals, kpath, lambda v: "" if len(v) <= 63 else "at most 63 characters")
                    if not items:
                        c.add(kpath, "must list at least one allowed value ('*' for any)")
                    wl.append((k, tuple(items)))
        addrs = _strings(c, b.get("addresses"), f"{path}.addresses", _cidr_ok)
        out.append(IdentityBinding(name=str(name), nodes=nodes, node_selector=tuple(selector),
                                   service_accounts=sas, workload_labels=tuple(sorted(wl)),
                                   addresses=tuple(str(ipaddress.ip_network(a, strict=False)) for a in addrs)))
    for node, sas in legacy:
        out.append(IdentityBinding(name=f"nodeServiceAccounts.{node}", nodes=(node,), service_accounts=sas,
                                   workload_labels=(("*", ("*",)),)))
    return tuple(out)


# ---------------------------------------------------------------- decisions


def bindings_of(mesh: Any) -> tuple[IdentityBinding, ...]:
    return tuple(getattr(mesh, "identity_bindings", ()) or ())


def node_bindings(mesh: Any, node: str, node_labels: Mapping[str, str]) -> list[IdentityBinding]:
    return [b for b in bindings_of(mesh) if b.matches_node(node, node_labels)]


def _labels_text(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"


def identity_refused(mesh: Any, node: str, node_labels: Mapping[str, str], namespace: str,
                     service_account: str) -> str:
    """'' when a binding on `node` allows the service account, else which binding is missing."""
    matching = node_bindings(mesh, node, node_labels)
    if not matching:
        return (f"no MeshConfig spec.identityBindings entry matches node {node} (node labels: "
                f"{_labels_text(node_labels)}); bind {namespace}/{service_account} to it: add a binding with "
                f"nodes: [{node}] and serviceAccounts: [{namespace}/{service_account}]")
    if any(b.binds(namespace, service_account) for b in matching):
        return ""
    names = ", ".join(b.name for b in matching)
    return (f"service account {namespace}/{service_account} is not bound to node {node}: the bindings that "
            f"match it ({names}) do not list it; add {namespace}/{service_account} to serviceAccounts of a "
            "binding matching this node in MeshConfig spec.identityBindings")


def workload_refused(mesh: Any, node: str, node_labels: Mapping[str, str], namespace: str,
                     service_account: str, labels: Mapping[str, str]) -> str:
    """'' when some binding on `node` allows this service account with these labels."""
    why = identity_refused(mesh, node, node_labels, namespace, service_account)
    if why:
        return why
    bound = [b for b in node_bindings(mesh, node, node_labels) if b.binds(namespace, service_account)]
    refused = []
    for b in bound:
        bad = b.label_refused(labels)
        if not bad:
            return ""
        refused.append(f"{b.name} does not allow label {bad}")
    return (f"labels {_labels_text(labels)} are not allowed for {namespace}/{service_account} on node {node}: "
            f"{'; '.join(refused)}; list them in workloadLabels of the binding")


def owned_networks(mesh: Any, node: str, node_labels: Mapping[str, str],
                   attested: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The addresses `node` owns: those attested (its join address) and those
    bindings matching it declare."""
    nets = [ipaddress.ip_network(a) for a in attested if a]
    for b in node_bindings(mesh, node, node_labels):
        nets += [ipaddress.ip_network(a) for a in b.addresses]
    return nets


def address_refused(mesh: Any, node: str, node_labels: Mapping[str, str], attested: Sequence[str],
                    address: str, what: str) -> str:
    """'' when `address` is one `node` owns, else why not."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{what} {address!r} is not an IP address"
    nets = owned_networks(mesh, node, node_labels, attested)
    if any(ip in n for n in nets):
        return ""
    owned = ", ".join(str(n) for n in nets) or "none"
    return (f"{what} {address} is not an address node {node} owns (owned: {owned}; a node owns the address it "
            "joined from and the addresses MeshConfig spec.identityBindings[].addresses declares for it)")
