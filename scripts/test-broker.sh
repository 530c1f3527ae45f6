#!/usr/bin/env bash
# Installs the Kafka-compatible test broker `tansu` (into ~/.cargo/bin) unless one is already
# there. The Kafka tests start their own broker processes from it (tansu on PATH, in
# ~/.cargo/bin, or $TANSU_BIN). Idempotent; quick when installed.
#
# tansu 0.6 with the `dynostore` feature, for its in-memory storage (memory://). Building it
# takes about 10 minutes on 2 cores (longer on a loaded machine).
set -euo pipefail

if [[ -n "${TANSU_BIN:-}" && -x "${TANSU_BIN}" ]]; then
    exit 0
fi
if command -v tansu >/dev/null 2>&1 || [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]]; then
    exit 0
fi
echo "== installing the test Kafka broker (cargo install tansu --features dynostore)" >&2
cargo install tansu --version '^0.6' --features dynostore --locked
