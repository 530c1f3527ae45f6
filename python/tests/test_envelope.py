"""The envelope: the spec's shape for every optional field, the metadata merge, reserved keys;
the module API's semantics (sinks, errors, opt-out, egress selection)."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

import pytest

import trickle_relay
from trickle_relay import (
    build_event_envelope,
    get_telemetry_sink,
    publish_event,
    publish_raw_event,
    set_telemetry_sink,
)

from conftest import Collector, canonical, child_env, run_child

RESERVED = [
    "type",
    "client_source",
    "timestamp",
    "session_id",
    "connection_id",
    "pipeline_ids",
    "user_id",
    "error",
    "connection_info",
]


def spec_envelope(event_type: str, id_: str, ts: str, **kw: Any) -> dict[str, Any]:
    """The envelope as shared/spec/telemetry.md describes it (the seed's builder, with the
    reserved keys protected): written here independently of the package."""
    data: dict[str, Any] = {"type": event_type, "client_source": "scope", "timestamp": ts}
    for key in ["session_id", "connection_id", "pipeline_ids", "user_id", "error", "connection_info"]:
        if kw.get(key):
            data[key] = kw[key]
    for k, v in (kw.get("metadata") or {}).items():
        if k not in RESERVED:
            data[k] = v
    return {"id": id_, "type": "stream_trace", "timestamp": ts, "data": data}


def check_stamp(env: dict[str, Any]) -> None:
    assert uuid.UUID(env["id"]).version == 4
    assert str(uuid.UUID(env["id"])) == env["id"]
    assert re.fullmatch(r"[0-9]{13}", env["timestamp"])
    assert abs(int(env["timestamp"]) - time.time() * 1000) < 60_000
    assert env["data"]["timestamp"] == env["timestamp"]


def same_as_spec(env: dict[str, Any], event_type: str, **kw: Any) -> None:
    check_stamp(env)
    want = spec_envelope(event_type, env["id"], env["timestamp"], **kw)
    # Byte for byte, key order included.
    assert canonical(env) == canonical(want)


ERROR = {
    "error_type": "pipeline_load_failed",
    "message": "CUDA out of memory",
    "exception_type": "RuntimeError",
    "recoverable": False,
}
HEARTBEAT_META = {
    "mode": "local",
    "frames_in": 300,
    "frames_out": 299,
    "fps_in": 29.97,
    "fps_out": 29.9,
    "elapsed_ms": 10000,
    "since_last_heartbeat_ms": 10000,
    "pipeline_fps": 30.5,
    "vram_allocated_mb": 1234.5,
    "vram_reserved_mb": 2048.0,
}
CONNECTION_INFO = {
    "gpu_type": "H100",
    "fal_region": "us-east",
    "fal_runner_id": "r-1",
    "fal_log_labels": {"b": 1, "a": [1, 2, {"z": None, "y": True}]},
}


def test_minimal_envelope():
    env = build_event_envelope("session_created")
    assert list(env) == ["id", "type", "timestamp", "data"]
    same_as_spec(env, "session_created")


def test_every_optional_field_fast_path():
    kw = dict(
        session_id="s-1",
        connection_id="c-1",
        pipeline_ids=["p1", "p2"],
        user_id="u-1",
        error=ERROR,
        metadata=HEARTBEAT_META,
    )
    same_as_spec(build_event_envelope("error", **kw), "error", **kw)


def test_every_optional_field_with_connection_info():
    kw = dict(
        session_id="s-1",
        connection_id="c-1",
        pipeline_ids=["p1"],
        user_id="u-1",
        error=ERROR,
        metadata={"mode": "livepeer", "startup_ms": 4321, "nested": {"z": 1, "a": 2}},
        connection_info=CONNECTION_INFO,
    )
    same_as_spec(build_event_envelope("runner_ready", **kw), "runner_ready", **kw)


def test_empty_values_are_omitted():
    env = build_event_envelope(
        "stream_started",
        session_id="",
        connection_id=None,
        pipeline_ids=[],
        user_id="",
        error={},
        metadata={},
        connection_info={},
    )
    assert list(env["data"]) == ["type", "client_source", "timestamp"]


def test_metadata_merge_keeps_order_and_cannot_override_reserved_keys():
    meta = {"z": 1, "a": "x", **{k: "HACK" for k in RESERVED}, "m": [1.5, None, True]}
    env = build_event_envelope("stream_heartbeat", session_id="s", metadata=meta)
    same_as_spec(env, "stream_heartbeat", session_id="s", metadata=meta)
    assert env["data"]["session_id"] == "s"
    assert env["data"]["type"] == "stream_heartbeat"
    assert list(env["data"])[4:] == ["z", "a", "m"]
    # The same rule on the general path (a connection_info dict takes it).
    info = {"gpu_type": "H100"}
    env = build_event_envelope("stream_heartbeat", session_id="s", metadata=meta, connection_info=info)
    same_as_spec(env, "stream_heartbeat", session_id="s", metadata=meta, connection_info=info)
    assert list(env["data"])[5:] == ["z", "a", "m"]


def test_seed_error_dict_in_another_shape_is_kept_as_given():
    err = {"message": "boom", "error_type": "x", "extra": {"k": 1}}
    same_as_spec(build_event_envelope("error", error=err), "error", error=err)


def test_values_json_cannot_carry():
    # NaN and infinity are written null (Python would write NaN, which is not JSON).
    env = build_event_envelope("stream_heartbeat", metadata={"fps": float("nan"), "x": float("inf")})
    assert env["data"]["fps"] is None and env["data"]["x"] is None
    with pytest.raises(TypeError, match="set"):
        build_event_envelope("x", metadata={"bad": {1, 2}})
    with pytest.raises(TypeError, match="64 bits"):
        build_event_envelope("x", metadata={"big": 2**70})
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(TypeError, match="nested"):
        build_event_envelope("x", metadata={"loop": loop})
    with pytest.raises(TypeError):
        build_event_envelope(42)  # type: ignore[arg-type]


def test_publish_event_to_a_python_sink_gets_the_built_envelope():
    sink = Collector()
    set_telemetry_sink(sink)
    assert get_telemetry_sink() is sink
    kw = dict(session_id="s", pipeline_ids=["p"], metadata=HEARTBEAT_META, connection_info=CONNECTION_INFO)
    publish_event("stream_heartbeat", **kw)
    publish_event("stream_stopped", session_id="s")
    assert len(sink.events) == 2
    same_as_spec(sink.events[0], "stream_heartbeat", **kw)
    same_as_spec(sink.events[1], "stream_stopped", session_id="s")
    assert sink.events[0]["id"] != sink.events[1]["id"]


def test_publish_never_raises_and_counts():
    class Raising:
        def emit(self, event):
            raise RuntimeError("sink is broken")

    before = trickle_relay.stats()
    set_telemetry_sink(None)
    publish_event("no_sink")
    set_telemetry_sink(Raising())
    publish_event("stream_started")
    publish_raw_event({"id": "x", "data": {}})
    publish_event("x", metadata={"bad": object()})  # cannot be JSON: counted, not raised
    set_telemetry_sink(trickle_relay.LogSink())
    publish_raw_event({"no": "id"})  # not an envelope: counted
    after = trickle_relay.stats()
    assert after["no_sink"] - before["no_sink"] == 1
    assert after["sink_errors"] - before["sink_errors"] == 2
    assert after["invalid"] - before["invalid"] == 2
    assert after["sink"] == "log"


def test_publish_raw_event_is_verbatim():
    sink = Collector()
    set_telemetry_sink(sink)
    env = build_event_envelope("stream_started", session_id="s")
    publish_raw_event(env)
    assert sink.events == [env] and sink.events[0] is env


def test_set_telemetry_sink_rejects_objects_without_emit():
    with pytest.raises(TypeError, match="emit"):
        set_telemetry_sink(object())
    with pytest.raises(TypeError, match="emit"):
        set_telemetry_sink(type("NotCallable", (), {"emit": 3})())
    assert get_telemetry_sink() is None


def test_native_sink_emit_rejects_what_is_not_an_envelope():
    sink = trickle_relay.LogSink()
    with pytest.raises(TypeError, match="dict"):
        sink.emit([1, 2])
    with pytest.raises(ValueError, match="id"):
        sink.emit({"type": "stream_trace"})
    sink.emit(build_event_envelope("ok"))
    assert sink.stats()["emitted"] == 1


def test_bad_urls_and_sizes_are_clear_errors():
    for bad in ["", "not a url", "ftp://host/x", "http://", "/relative"]:
        with pytest.raises(ValueError, match="events_url"):
            trickle_relay.TrickleEventsSink(bad)
        with pytest.raises(ValueError, match="events_url"):
            trickle_relay.EventsRelay(bad)
    with pytest.raises(ValueError, match="control_url"):
        trickle_relay.EventsRelay("http://127.0.0.1:1/e", control_url="nope")
    with pytest.raises(ValueError, match="maxsize"):
        trickle_relay.TrickleEventsSink("http://127.0.0.1:1/e", maxsize=0)
    with pytest.raises(ValueError, match="timeout"):
        trickle_relay.LogSink() and trickle_relay.TrickleEventsSink("http://127.0.0.1:1/e").close(timeout=-1)


def test_help_shows_docstrings():
    for obj in [
        trickle_relay,
        trickle_relay.publish_event,
        trickle_relay.build_event_envelope,
        trickle_relay.install_default_egress_sink,
        trickle_relay.TrickleEventsSink,
        trickle_relay.EventsRelay,
        trickle_relay.MetricsReporter,
    ]:
        assert obj.__doc__ and len(obj.__doc__) > 40, obj
    assert "maxsize" in trickle_relay.TrickleEventsSink.__doc__
    assert "maxsize=256" in trickle_relay.TrickleEventsSink.__text_signature__
    import inspect

    params = inspect.signature(trickle_relay.EventsRelay).parameters
    assert list(params) == ["events_url", "control_url", "session_id", "connection_id"]
    sink = trickle_relay.TrickleEventsSink("http://127.0.0.1:9/e")
    assert sink.maxsize == trickle_relay.DEFAULT_QUEUE_MAXSIZE == 256
    assert "(event_type, session_id=None" in trickle_relay.publish_event.__text_signature__.replace("$module, ", "")


def test_publish_event_from_many_threads_to_a_python_sink():
    sink = Collector()
    lock = threading.Lock()

    class Locked:
        def emit(self, event):
            with lock:
                sink.emit(event)

    set_telemetry_sink(Locked())

    def work(t: int) -> None:
        for i in range(500):
            publish_event("stream_heartbeat", metadata={"t": t, "i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    got = sorted((e["data"]["t"], e["data"]["i"]) for e in sink.events)
    assert got == sorted((t, i) for t in range(8) for i in range(500))
    assert len({e["id"] for e in sink.events}) == 4000


OPT_OUT = """
import json, trickle_relay as t
class C:
    def __init__(self): self.n = 0
    def emit(self, e): self.n += 1
c = C()
installed = t.install_default_egress_sink()
t.set_telemetry_sink(c)
t.publish_event("stream_started")
t.publish_raw_event(t.build_event_envelope("x"))
print(json.dumps({"enabled": t.telemetry_enabled(), "installed": installed, "calls": c.n,
                  "opted_out": t.stats()["opted_out"]}))
"""


@pytest.mark.parametrize(
    "env, enabled",
    [
        ({"SCOPE_TELEMETRY_DISABLED": "1"}, False),
        ({"DO_NOT_TRACK": "1"}, False),
        ({"SCOPE_TELEMETRY_DISABLED": "true", "DO_NOT_TRACK": "0"}, False),
        ({"SCOPE_TELEMETRY_DISABLED": "0", "DO_NOT_TRACK": "1"}, True),
        ({}, True),
    ],
)
def test_opt_out_wins_over_every_sink(env, enabled):
    got = run_child(OPT_OUT, child_env(SCOPE_TELEMETRY_LOG_SINK="1", **env))
    assert got["enabled"] is enabled
    # An explicit sink included: an opted-out process publishes nothing.
    assert got == {
        "enabled": enabled,
        "installed": enabled,
        "calls": 2 if enabled else 0,
        "opted_out": 0 if enabled else 2,
    }


EGRESS = """
import json, trickle_relay as t
first = t.install_default_egress_sink()
sink = t.get_telemetry_sink()
second = t.install_default_egress_sink()
same = t.get_telemetry_sink() is sink
print(json.dumps({"installed": first, "again": second, "same": same,
                  "kind": type(sink).__name__ if sink is not None else None}))
if sink is not None and hasattr(sink, "close"):
    sink.close(timeout=0.2)
"""


def test_install_default_egress_sink_precedence(tmp_path):
    closed_port = "http://127.0.0.1:9/v1/metrics"
    base = {
        "SCOPE_METRICS_BUFFER_PATH": str(tmp_path / "metrics"),
        "SCOPE_KAFKA_BUFFER_PATH": str(tmp_path / "kafka"),
        "DAYDREAM_METRICS_URL": closed_port,
    }
    cases = [
        ({}, False, None),
        ({"SCOPE_TELEMETRY_LOG_SINK": "1", "SCOPE_CLOUD_API_KEY": "k", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}, True, "LogSink"),
        ({"SCOPE_CLOUD_API_KEY": "k", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}, True, "MetricsReporter"),
        ({"SCOPE_CLOUD_API_KEY": "k", "SCOPE_METRICS_ENABLED": "false", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}, True, "KafkaSink"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}, True, "KafkaSink"),
        ({"DO_NOT_TRACK": "1", "SCOPE_TELEMETRY_LOG_SINK": "1"}, False, None),
    ]
    for env, installed, kind in cases:
        got = run_child(EGRESS, child_env(**base, **env))
        assert got == {"installed": installed, "again": installed, "same": True, "kind": kind}, env
