"""Shared fixtures: a real trickle server in process, child Python processes, deadlines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

import trickle_relay
from trickle_relay.testing import TrickleServer

HERE = Path(__file__).parent

# Settings a child process must not inherit unless a test sets them.
EGRESS_ENV = [
    "SCOPE_TELEMETRY_LOG_SINK",
    "SCOPE_TELEMETRY_DISABLED",
    "DO_NOT_TRACK",
    "SCOPE_CLOUD_API_KEY",
    "SCOPE_METRICS_ENABLED",
    "KAFKA_BOOTSTRAP_SERVERS",
]


@pytest.fixture
def server():
    s = TrickleServer()
    yield s
    s.close()


@pytest.fixture
def channel(server) -> Callable[[], str]:
    """Creates a fresh JSONL channel and returns its URL."""
    return lambda: server.create_channel(f"events-{uuid.uuid4().hex[:12]}")


@pytest.fixture(autouse=True)
def no_sink():
    trickle_relay.set_telemetry_sink(None)
    yield
    trickle_relay.set_telemetry_sink(None)


class Collector:
    """A Python sink (the seed's protocol) that keeps what it gets."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Polls `cond` until truthy or the deadline; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EGRESS_ENV}
    env.update(extra)
    return env


def run_child(code: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    """Runs `code` in a new interpreter; it prints one JSON document last. Returns it."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def strip_annotations(envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope as its origin built it: without the client's annotations (spec: in `data`)."""
    out = json.loads(json.dumps(envelope))
    out["data"].pop("relayed_via", None)
    out["data"].pop("relay_received_timestamp", None)
    return out


def canonical(envelope: dict[str, Any]) -> str:
    """The envelope's bytes, keys in their order (what 'byte for byte' compares)."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
