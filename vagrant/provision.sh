#!/usr/bin/env bash
# Provisions one machine of a nodemesh cluster. The Vagrantfile (VMs) and the
# systemd cluster tier (booted systemd-nspawn machines, nodemesh/cluster.py,
# `make cluster`, tests/cluster) both run exactly this script, phase by phase:
#
#   provision.sh packages                 print the Debian packages a machine needs
#   provision.sh base                     install them and a venv with nodemesh's
#                                         Python dependencies (/opt/nodemesh/venv);
#                                         the tier runs this once, into its base root
#   provision.sh hosts NAME=IP...         name the cluster's machines in /etc/hosts
#   provision.sh controlplane IP          `nodemesh install controlplane`, the sample config
#   provision.sh token NODE               print a one-time join token for NODE (on the cp)
#   provision.sh node NAME IP CP_IP TOKEN_FILE
#                                         the sample workloads' users and services
#                                         (web: HTTP/1.1 on 8080, echo: gRPC on 9090),
#                                         `nodemesh install agent` joined with TOKEN_FILE
#   provision.sh upgrade NEW_SRC          run the nodemesh code at NEW_SRC from now on and
#                                         apply it as documented: `systemctl restart` of
#                                         the installed units (a restart drops nothing)
#
# The nodemesh source is at $NODEMESH_SRC (default /opt/nodemesh-src: Vagrant's
# synced folder, the tier's read-only bind mount); the venv sees it through a
# .pth file, so the running code is always that tree.
set -euo pipefail
SRC=${NODEMESH_SRC:-/opt/nodemesh-src}
VENV=/opt/nodemesh/venv
PY=$VENV/bin/python
CP_SOCK=unix:/run/nodemesh/controlplane.sock
WEB_UID=2001
CLIENT_UID=3001

PACKAGES=(systemd systemd-sysv dbus iproute2 iptables nftables python3 python3-venv
  curl iputils-ping procps ca-certificates util-linux)

die() { echo "provision: $*" >&2; exit 1; }

case "${1:-}" in
packages)
  echo "${PACKAGES[@]}"
  ;;
base)
  export DEBIAN_FRONTEND=noninteractive
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  [ -x $PY ] || /usr/bin/python3 -m venv $VENV
  # The dependencies only (pyproject.toml is the one list); the code is $SRC.
  mapfile -t deps < <(/usr/bin/python3 -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$SRC/pyproject.toml")
  $VENV/bin/pip install -q --disable-pip-version-check "${deps[@]}"
  site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$SRC" > "$site/nodemesh-src.pth"
  printf '#!/bin/sh\nexec %s -m nodemesh "$@"\n' "$PY" > /usr/local/bin/nodemesh
  chmod 0755 /usr/local/bin/nodemesh
  ;;
hosts)
  shift
  for pair in "$@"; do
    name=${pair%%=*} addr=${pair#*=}
    sed -i "/ $name\$/d" /etc/hosts
    echo "$addr $name" >> /etc/hosts
  done
  ;;
controlplane)
  ip=${2:?usage: provision.sh controlplane IP}
  nodemesh install controlplane --san "$ip" --san cp
  nodemesh apply -f "$SRC/vagrant/mesh.yaml" --server $CP_SOCK
  ;;
token)
  node=${2:?usage: provision.sh token NODE}
  nodemesh token create --node "$node" --ttl 2h --server $CP_SOCK
  ;;
node)
  name=${2:?usage: provision.sh node NAME IP CP_IP TOKEN_FILE} ip=${3:?} cp_ip=${4:?} token=${5:?}
  [ -s "$token" ] || die "no join token in $token (made on the control plane: provision.sh token $name)"
  id web >/dev/null 2>&1 || useradd --system --uid $WEB_UID --no-create-home web
  id client >/dev/null 2>&1 || useradd --system --uid $CLIENT_UID --no-create-home client
  mkdir -p /etc/nodemesh
  install -m 0600 "$token" /etc/nodemesh/join.token
  cat > /etc/nodemesh/agent.yaml <<YAML
node: {name: $name, address: $ip, zone: cluster}
controlPlane: {address: "$cp_ip:15010", joinTokenFile: /etc/nodemesh/join.token}
capture: {mode: iptables, failurePolicy: open}
workloads:
  - {name: web-$name, namespace: default, serviceAccount: web, labels: {app: web}, uid: $WEB_UID, ports: [8080, 9090]}
  - {name: client-$name, namespace: default, serviceAccount: client, labels: {app: client}, uid: $CLIENT_UID}
YAML
  cat > /etc/systemd/system/nodemesh-sample-web.service <<UNIT
[Unit]
Description=nodemesh sample workload: the web service's replica on $name
[Service]
User=web
ExecStart=/usr/bin/python3 $SRC/nodemesh/lab/labapp.py --name web-$name --node $name --port 8080
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
  cat > /etc/systemd/system/nodemesh-sample-grpc.service <<UNIT
[Unit]
Description=nodemesh sample workload: the echo gRPC service's replica on $name
[Service]
User=web
ExecStart=$PY $SRC/nodemesh/lab/labgrpc.py --name web-$name --port 9090
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now nodemesh-sample-web nodemesh-sample-grpc
  nodemesh install agent --config /etc/nodemesh/agent.yaml
  ;;
upgrade)
  new=${2:?usage: provision.sh upgrade NEW_SRC}
  [ -f "$new/nodemesh/__init__.py" ] || die "$new holds no nodemesh source tree"
  site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$new" > "$site/nodemesh-src.pth"
  for unit in nodemesh-agent nodemesh-controlplane; do
    if systemctl is-enabled -q $unit 2>/dev/null; then systemctl restart $unit; fi
  done
  (cd / && $PY -c 'import nodemesh; print("nodemesh", nodemesh.__version__, "from", nodemesh.__file__)')
  ;;
*)
  sed -n '2,25p' "$0" >&2
  exit 2
  ;;
esac
