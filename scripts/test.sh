#!/usr/bin/env bash
# Runs every check and test of trickle-relay: formatting, lints, then the whole test suite.
# Works on a fresh machine with the Rust toolchain and cargo-nextest; installs anything else the
# tests need, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

# rdkafka's bundled librdkafka links the system OpenSSL; install its headers if a machine lacks them.
if ! pkg-config --exists openssl 2>/dev/null; then
    echo "== installing pkg-config and libssl-dev (for rdkafka)" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq pkg-config libssl-dev
fi

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== test Kafka broker (tansu)" >&2
scripts/test-broker.sh
echo "== Python test venv (livepeer-gateway, pytest)" >&2
# The trickle_relay package itself is built by the nextest run below (crates/python, with the
# workspace's features: nothing compiled twice) and installed into this venv by its test.
scripts/python-env.sh
echo "== cargo nextest run" >&2
cargo nextest run --workspace --no-fail-fast
