#!/usr/bin/env bash
# Installs everything twill's build, tests and lab need on a fresh Debian machine (as root).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(iproute2 iptables nftables etcd-server etcd-client containernetworking-plugins
      protobuf-compiler golang-go golang-github-appc-cni-dev iputils-ping iperf3
      ethtool kmod procps python3-pip ca-certificates openssl curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo (Rust >= 1.85) is required; install it with rustup first" >&2
  exit 1
fi

# kubernetes-validate checks the manifests (PyPI).
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  pip install --quiet --disable-pip-version-check kubernetes-validate >/dev/null 2>&1 ||
    pip install --quiet --disable-pip-version-check --break-system-packages kubernetes-validate
fi

# cniharness: a container runtime's view (reference libcni), built offline from Debian's packages.
if ! command -v cniharness >/dev/null; then
  bash tests/cniharness/build.sh /usr/local/bin/cniharness >/dev/null
fi

# VXLAN and bridge netfilter modules (no-ops where built in).
modprobe vxlan 2>/dev/null || true
modprobe br_netfilter 2>/dev/null || true
