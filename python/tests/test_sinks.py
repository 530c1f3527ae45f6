"""The sink classes against real endpoints: the log sink into Python logging, the HTTP
reporter against a real HTTP server, the Kafka sink's disk buffer without a broker."""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import trickle_relay
from trickle_relay import (
    KafkaSink,
    LogSink,
    MetricsReporter,
    build_event_envelope,
    publish_event,
    publish_raw_event,
    set_telemetry_sink,
)

from conftest import wait_for


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.levelno, record.getMessage()))


def test_log_sink_lines_reach_python_logging():
    handler = Records()
    logger = logging.getLogger("trickle_relay.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sink = LogSink()
        set_telemetry_sink(sink)
        publish_event("stream_started", session_id="s-1")
        env = build_event_envelope("stream_stopped", session_id="s-1", connection_id="c-1")
        env["data"]["relayed_via"] = "trickle"
        publish_raw_event(env)
        wait_for(lambda: len(handler.lines) >= 2, what="two TELEMETRY log records")
        name, level, first = handler.lines[0]
        assert name == "trickle_relay.telemetry" and level == logging.INFO
        assert first.startswith("TELEMETRY type=stream_started id=")
        assert first.endswith(" session=s-1 connection=- relayed_via=-")
        assert handler.lines[1][2] == (
            f"TELEMETRY type=stream_stopped id={env['id']} session=s-1 connection=c-1 relayed_via=trickle"
        )
        assert sink.stats()["emitted"] == 2
    finally:
        logger.removeHandler(handler)


class Collector(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []
    auth: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers["Content-Length"])
        body = self.rfile.read(n)
        type(self).auth.append(self.headers["Authorization"])
        type(self).bodies.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server():
    Collector.bodies, Collector.auth = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/metrics"
    httpd.shutdown()


def test_metrics_reporter_posts_api_events(metrics_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_METRICS_BUFFER_PATH", str(tmp_path / "buffer"))
    monkeypatch.setenv("SCOPE_METRICS_FLUSH_INTERVAL_MS", "50")
    monkeypatch.delenv("SCOPE_CLOUD_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        MetricsReporter(url=metrics_server)
    reporter = MetricsReporter(api_key="secret-key", url=metrics_server)
    set_telemetry_sink(reporter)
    for i in range(20):
        publish_event("stream_heartbeat", session_id="s", metadata={"i": i})
    assert reporter.flush(timeout=10.0) == "drained"
    events = [e for b in Collector.bodies for e in b["events"]]
    assert [e["data"]["i"] for e in events] == list(range(20))
    assert all(a == "Bearer secret-key" for a in Collector.auth)
    body = Collector.bodies[0]
    assert body["app"] == "scope" and body["host"]
    e = events[0]
    assert e["type"] == "stream_heartbeat" and e["data"]["type"] == "stream_heartbeat"
    assert e["id"] and e["timestamp"] == e["data"]["timestamp"]
    final = reporter.close(timeout=5.0)
    assert final["acked"] == 20 and final["buffered"] == 0
    assert "secret-key" not in repr(reporter)


def test_kafka_sink_keeps_events_on_disk_without_a_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("SCOPE_KAFKA_BUFFER_PATH", str(tmp_path / "kafka"))
    sink = KafkaSink()
    set_telemetry_sink(sink)
    for i in range(5):
        publish_event("stream_started", metadata={"i": i})
    wait_for(lambda: sink.stats()["accepted"] == 5, what="5 events accepted")
    final = sink.close(timeout=0.2)
    assert final["delivered"] == 0 and final["buffered"] == 5
    assert os.listdir(tmp_path / "kafka"), "nothing on disk"
    # The next sink on the same buffer finds them.
    again = KafkaSink()
    assert again.stats()["recovered"] == 5
    again.close(timeout=0.2)


def test_sink_stats_shape():
    s = LogSink().stats()
    assert set(s) >= {"emitted", "delivered", "dropped_high", "dropped_low", "queued", "reports"}
    assert trickle_relay.stats().keys() >= {"published", "invalid", "no_sink", "opted_out", "sink_errors", "sink"}
