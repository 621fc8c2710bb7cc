#!/usr/bin/env bash
# README command 1: install, build, and bring up a 3-node lab with pods (left running;
# `target/release/twill-lab down` removes it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --quiet
exec target/release/twill-lab up --nodes "${NODES:-3}" --pods "${PODS:-2}"
