"""nodemesh: a service mesh for Linux nodes. This package holds what the node
agent and the control plane share: the config model, identity helpers, the
xDS naming contract and our own generated protobufs (nodemesh.v1)."""

__version__ = "0.1.0"
