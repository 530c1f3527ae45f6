#!/usr/bin/env bash
# Runs every check and test of trickle-relay: formatting, lints, then the whole test suite.
# Works on a fresh machine with the Rust toolchain and cargo-nextest; installs anything else the
# tests need, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== test Kafka broker (tansu)" >&2
scripts/test-broker.sh
echo "== cargo nextest run" >&2
cargo nextest run --workspace --no-fail-fast
