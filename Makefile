# The two commands the README promises: `make demo` and `make test`.
# Both install what they need first (scripts/setup.sh, idempotent). Run as root.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit netns interop cluster-test cluster cluster-down bench proto lint clean-netns

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m nodemesh demo

# Lint first: a ruff or mypy --strict finding fails `make test` (and so CI) before the tiers run.
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

unit: setup
	$(PY) -m pytest -q tests/unit

netns: setup
	$(PY) -m pytest -q tests/netns

interop: setup
	$(PY) -m pytest -q tests/interop

# The systemd cluster tier (tests/cluster, part of `make test`): a control plane and
# two nodes as booted systemd-nspawn machines, provisioned by vagrant/provision.sh.
cluster-test: setup
	$(PY) -m pytest -q tests/cluster

# The same cluster to try by hand; the base root is built once under /var/cache/nodemesh-cluster.
cluster: setup
	$(PY) -m nodemesh.cluster up

cluster-down:
	$(PY) -m nodemesh.cluster down

bench: setup
	$(PY) bench/run.py

proto: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. nodemesh/v1/mesh.proto

# ruff (rule set and reasons in pyproject.toml) and mypy --strict over all hand-written code;
# both run even when the first fails, so one pass shows everything.
LINT_PATHS := nodemesh nodeagent controlplane tests bench
lint: setup
	@rc=0; .venv/bin/ruff check $(LINT_PATHS) || rc=1; .venv/bin/mypy || rc=1; exit $$rc

# Remove namespaces left by an interrupted demo or test run.
clean-netns:
	$(PY) -m nodemesh lab cleanup
