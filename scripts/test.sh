#!/usr/bin/env bash
# The test suite in lanes (README command 2 runs them all; CI runs exactly that).
#
#   bash scripts/test.sh        everything, as root: setup, fmt, clippy, build, unit + root lanes
#   bash scripts/test.sh unit   the unit lane: no root, no setup (cargo test as any user)
#   bash scripts/test.sh root   the root lane: setup, build, the root-only tests only
#
# Root-only tests are the integration tests in tests/ (built with --features twill-tests/root)
# and the few unit tests marked #[ignore = "needs root: ..."] in the other crates.
set -euo pipefail
cd "$(dirname "$0")/.."
lane=${1:-all}
case "$lane" in
  all | unit | root) ;;
  *)
    echo "usage: $0 [unit|root]" >&2
    exit 2
    ;;
esac
if [ "$lane" != unit ] && [ "$(id -u)" != 0 ]; then
  echo "test.sh $lane: the root lane needs root (namespaces, etcd, containerd, nftables); try: $0 unit" >&2
  exit 2
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
run() { "$@" 2>&1 | tee -a "$log" || status=$?; }

case "$lane" in
  all)
    bash scripts/setup.sh
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --features twill-tests/root --quiet -- -D warnings
    cargo build --workspace --bins --quiet
    # Doc examples marked `ignore` are sketches, not tests: --include-ignored goes to the
    # unit and integration test binaries only, the docs run on their own.
    run cargo test --workspace --features twill-tests/root --lib --bins --tests -- --include-ignored --test-threads=4
    run cargo test --workspace --doc
    ;;
  unit)
    run cargo test --workspace
    ;;
  root)
    bash scripts/setup.sh
    cargo build --workspace --bins --quiet
    run cargo test -p twill-tests --features root -- --test-threads=4
    run cargo test --workspace --lib --bins -- --ignored
    ;;
esac
# One closing line over every test binary (cargo prints one "test result" per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "\ntwill: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
