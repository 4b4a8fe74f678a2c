"""The namespace lab: a small mesh of network namespaces on this machine, with
the real agent and control plane in them. `nodemesh demo` and the root test
tiers build on it (harness.py: namespaces, bridge, processes; demo.py: the
two-node demo; labapp.py: the workload app its services run; loopback.py: node
proxies on loopback addresses, no root, for the unit tier and bench/profile_l7.py). Like the CLI,
it sits above both sides and may import them; the shared model does not."""
