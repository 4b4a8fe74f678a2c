#!/usr/bin/env bash
# Provisions one VM of the Vagrant cluster: installs nodemesh under /opt/nodemesh and
# starts the control plane (on "cp") or an agent with a demo workload (on nodeN).
set -euo pipefail
name=$1 ip=$2 cp_ip=$3
rsync -a --delete /opt/nodemesh-src/ /opt/nodemesh/
cd /opt/nodemesh
bash scripts/setup.sh
install -m 0644 deploy/systemd/*.service /etc/systemd/system/
systemctl daemon-reload
if [ "$name" = cp ]; then
  echo "NODEMESH_CP_ARGS=\"--san $ip\"" > /etc/default/nodemesh-controlplane
  systemctl enable --now nodemesh-controlplane
  for i in $(seq 30); do
    .venv/bin/nodemesh get service --server unix:/run/nodemesh/controlplane.sock >/dev/null 2>&1 && break
    sleep 1
  done
  .venv/bin/nodemesh apply -f vagrant/mesh.yaml --server unix:/run/nodemesh/controlplane.sock
  exit 0
fi
id web >/dev/null 2>&1 || useradd --system --uid 2001 web
id client >/dev/null 2>&1 || useradd --system --uid 3001 client
mkdir -p /etc/nodemesh
# The host made a one-time join token for this node on the cp VM (Vagrantfile trigger).
install -m 0600 "/opt/nodemesh-src/vagrant/tokens/$name.token" /etc/nodemesh/join.token
cat > /etc/nodemesh/agent.yaml <<YAML
node: {name: $name, address: $ip, zone: vagrant}
controlPlane: {address: "$cp_ip:15010", joinTokenFile: /etc/nodemesh/join.token}
capture: {mode: iptables}
workloads:
  - {name: web-$name, namespace: default, serviceAccount: web, labels: {app: web}, uid: 2001, ports: [8080]}
  - {name: client-$name, namespace: default, serviceAccount: client, labels: {app: client}, uid: 3001}
YAML
cat > /etc/systemd/system/nodemesh-demo-web.service <<UNIT
[Unit]
Description=nodemesh demo workload (web)
[Service]
User=web
ExecStart=/opt/nodemesh/.venv/bin/python -m nodemesh.labapp --name web-$name --node $name --port 8080
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now nodemesh-demo-web nodemesh-agent
