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

# The shared-dedup tests run a real Redis (Debian's redis-server package); install it if missing.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (for the shared-dedup tests)" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server
fi

# The metrics tests scrape every process with a real Prometheus and check each exposition with
# promtool (both in Debian's prometheus package); install it if missing.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "== installing prometheus (for the metrics tests)" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq prometheus
fi

# The README recipe test runs the README's shell block as written, which uses curl.
if ! command -v curl >/dev/null 2>&1; then
    echo "== installing curl (for the README recipe test)" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq curl
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

# A test that cannot run on this machine fails, unless its opt-out variable (TRICKLE_TEST_SKIP_*)
# is set; the opt-outs in effect are listed before the suite and again after it.
optouts() {
    local set
    set=$(env | grep -E '^TRICKLE_TEST_SKIP_[A-Z0-9_]*=.' | grep -vE '=0$' | sort || true)
    if [[ -n "$set" ]]; then
        echo "== opt-outs set: these tests SKIP by request:" >&2
        sed 's/^/   /' <<<"$set" >&2
    else
        echo "== opt-outs set: none (every test runs)" >&2
    fi
}
echo "== environment checks" >&2
probe=$(mktemp -d)
if unshare --user --map-root-user --mount sh -c "mount -t tmpfs -o size=1m tmpfs '$probe'" 2>/dev/null; then
    echo "   user + mount namespaces: available (the real disk-full test runs)" >&2
elif [[ -n "${TRICKLE_TEST_SKIP_DISK_FULL:-}" && "${TRICKLE_TEST_SKIP_DISK_FULL}" != 0 ]]; then
    echo "   user + mount namespaces: NOT available; TRICKLE_TEST_SKIP_DISK_FULL is set: the disk-full test SKIPS" >&2
else
    echo "   user + mount namespaces: NOT available: the real disk-full test will FAIL." >&2
    echo "   Allow unprivileged user namespaces, or set TRICKLE_TEST_SKIP_DISK_FULL=1 to skip it knowingly." >&2
fi
rmdir "$probe" 2>/dev/null || true
optouts

echo "== cargo nextest run (process-heavy tests one at a time: .config/nextest.toml)" >&2
status=0
cargo nextest run --workspace --no-fail-fast || status=$?
optouts
exit "$status"
