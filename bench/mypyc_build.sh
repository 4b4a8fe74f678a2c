#!/bin/sh
# Build a copy of the tree with the hot pure modules compiled by mypyc, for
# bench/mypyc_eval.py (never the installed tree: nodemesh ships pure Python).
# Usage: bench/mypyc_build.sh [DIR]   (default /tmp/mypyc-eval); then
#   cd DIR && PYTHONPATH=DIR <repo>/.venv/bin/python <repo>/bench/mypyc_eval.py
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/tmp/mypyc-eval}
rm -rf "$dir"
mkdir -p "$dir"
cp -r "$repo/nodeagent" "$repo/nodemesh" "$repo/controlplane" "$repo/pyproject.toml" "$dir/"
find "$dir" -name __pycache__ -prune -exec rm -rf {} +
cd "$dir"
"$repo/.venv/bin/mypyc" nodeagent/proxy/http/pathnorm.py nodeagent/proxy/http/route_select.py \
    nodeagent/proxy/http/h1.py nodeagent/proxy/hbone.py
