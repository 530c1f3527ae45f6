#!/usr/bin/env bash
# Creates the Python virtual environment the interop tests use (target/python-venv, or
# $TRICKLE_RELAY_VENV), with the packages in scripts/python-requirements.txt. Idempotent: a stamp
# named after the requirements' hash makes a second run a no-op; a changed list reinstalls.
# Tests find it at the same path; call its interpreter as `$VENV/bin/python -m ...`, never its
# script shims (their shebangs name the path the venv was created at).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRICKLE_RELAY_VENV:-target/python-venv}
REQ=scripts/python-requirements.txt
STAMP="$VENV/.installed-$(sha256sum "$REQ" | cut -c1-16)"
if [[ -f "$STAMP" ]]; then
    exit 0
fi
echo "== creating the Python test venv ($VENV)" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --ignore-requires-python -r "$REQ"
rm -f "$VENV"/.installed-*
touch "$STAMP"
