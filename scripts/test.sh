#!/usr/bin/env bash
# The whole test suite (README command 2; CI runs exactly this). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
cargo test --workspace -- --test-threads=4
