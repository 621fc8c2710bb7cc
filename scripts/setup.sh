#!/usr/bin/env bash
# Installs everything twill's build, tests and lab need on a fresh Debian machine (as root).
# Idempotent: a second run only checks.
#   scripts/setup.sh           install what is missing
#   scripts/setup.sh --check   list what is missing, install nothing; exit 0 if nothing is, else 1
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=false
case "${1-}" in
  "") ;;
  --check) check_only=true ;;
  *) echo "usage: scripts/setup.sh [--check]" >&2; exit 2 ;;
esac

pkgs=(iproute2 iptables nftables etcd-server etcd-client containernetworking-plugins
      protobuf-compiler libprotobuf-dev golang-go golang-github-appc-cni-dev iputils-ping iperf3
      ethtool kmod procps python3-pip ca-certificates openssl curl containerd runc busybox-static)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# etcd-client's build script runs protoc on protos that import google/protobuf/*.proto. protoc
# finds those only in /usr/include, which libprotobuf-dev provides: protobuf-compiler installed
# with --no-install-recommends has none. So the check compiles such an import, as the build does.
protoc_finds_well_known_types() {
  local protoc="${PROTOC:-protoc}" dir rc=0
  if ! command -v "$protoc" >/dev/null; then
    [ -f /usr/include/google/protobuf/descriptor.proto ]
    return
  fi
  dir=$(mktemp -d)
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$dir/wkt.proto"
  "$protoc" --proto_path="$dir" -o /dev/null "$dir/wkt.proto" >/dev/null 2>&1 || rc=1
  rm -rf "$dir"
  return $rc
}

# Everything the steps below provide, one line per missing piece (package names as apt knows them).
list_missing() {
  local p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
      echo "package $p"
  done
  command -v cargo >/dev/null || echo "cargo (Rust >= 1.85; install it with rustup)"
  command -v "${PROTOC:-protoc}" >/dev/null || echo "protoc (package protobuf-compiler)"
  protoc_finds_well_known_types ||
    echo "protobuf well-known types: google/protobuf/descriptor.proto (package libprotobuf-dev)"
  python3 -c 'import kubernetes_validate' 2>/dev/null ||
    echo "kubernetes-validate (PyPI: pip install kubernetes-validate)"
  if ! command -v cniharness >/dev/null; then
    echo "cniharness (bash tests/cniharness/build.sh /usr/local/bin/cniharness)"
  elif [ "$(cat /usr/local/bin/.cniharness.sha256 2>/dev/null)" != "$(sha256sum tests/cniharness/main.go | cut -d' ' -f1)" ]; then
    echo "cniharness is older than tests/cniharness/main.go (bash scripts/setup.sh rebuilds it)"
  fi
}

if $check_only; then
  gaps=$(list_missing)
  if [ -n "$gaps" ]; then
    echo "setup --check: missing:"
    sed 's/^/  /' <<<"$gaps"
    exit 1
  fi
  echo "setup --check: nothing missing"
  exit 0
fi

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
# Rebuilt when its source changed (a stamp of main.go's hash sits next to the binary).
harness_sum=$(sha256sum tests/cniharness/main.go | cut -d' ' -f1)
if ! command -v cniharness >/dev/null ||
  [ "$(cat /usr/local/bin/.cniharness.sha256 2>/dev/null)" != "$harness_sum" ]; then
  bash tests/cniharness/build.sh /usr/local/bin/cniharness >/dev/null
  echo "$harness_sum" >/usr/local/bin/.cniharness.sha256
fi

# VXLAN and bridge netfilter modules (no-ops where built in).
modprobe vxlan 2>/dev/null || true
modprobe br_netfilter 2>/dev/null || true

# Whatever is still missing now (a failed pip, a protoc without its includes) fails here, not
# later in a build script.
gaps=$(list_missing)
if [ -n "$gaps" ]; then
  echo "setup: still missing after install:" >&2
  sed 's/^/  /' <<<"$gaps" >&2
  exit 1
fi
