"""Runner to client through a real trickle server: TrickleEventsSink in one process, EventsRelay
in another; every event accounted for; every other message handed to Python; the GIL and the
event loop are free while the relay waits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from livepeer_gateway.channel_writer import JSONLWriter

import trickle_relay
from trickle_relay import (
    EventsRelay,
    TrickleEventsSink,
    build_event_envelope,
    publish_event,
    publish_raw_event,
    set_telemetry_sink,
)

from conftest import Collector, canonical, child_env, strip_annotations, wait_for

# The client process: an EventsRelay whose egress is a Python sink. It prints "ready" once the
# relay runs and "first" with the first envelope; then, with an expected total, it reads until
# every published event is accounted for (received, or reported dropped), else until the channel
# ends; and prints one JSON document.
CLIENT = r"""
import json, sys, threading, time
import trickle_relay as t

url, sid, cid, expected = sys.argv[1], sys.argv[2] or None, sys.argv[3] or None, int(sys.argv[4])
lock = threading.Lock()
first = threading.Event()

class Sink:
    def __init__(self):
        self.events = []
        self.dropped = {"python": 0, "runner": 0}
        self.received = 0
    def emit(self, event):
        with lock:
            self.events.append(event)
            if event["data"]["type"] == "telemetry_dropped":
                who = "python" if event["data"].get("sink") == "python" else "runner"
                self.dropped[who] += event["data"]["dropped"]
            else:
                self.received += 1
        if not first.is_set():
            first.set()
            print("first", flush=True)
    def accounted(self):
        with lock:
            return self.received + self.dropped["python"] + self.dropped["runner"]

sink = Sink()
t.set_telemetry_sink(sink)
relay = t.EventsRelay(url, session_id=sid, connection_id=cid)
print("ready", flush=True)
deadline = time.monotonic() + 120
if expected:
    while sink.accounted() < expected:
        s = relay.stats()
        if time.monotonic() > deadline or s["events_skipped_segments"] or s["events_broken_segments"]:
            raise SystemExit(f"accounted for {sink.accounted()} of {expected}: {s}")
        time.sleep(0.01)
    # The runner's final loss report comes after its last event: wait for the sink's own count.
else:
    messages = list(relay)
stats = relay.close()
# The forwarder hands over everything the relay egressed (its own drops reported to the sink).
while True:
    s = relay.stats()["egress"].get("python_sink", {})
    if s and s["queued"] == 0 and s["emitted"] == s["delivered"] + s["dropped"] + s["errors"] \
            and sink.dropped["python"] == s["dropped"]:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"forwarder did not finish: {s}")
    time.sleep(0.01)
with lock:
    print(json.dumps({"envelopes": sink.events, "stats": relay.stats()}))
"""


class Client:
    """The client process."""

    def __init__(self, url: str, sid: str | None, cid: str | None, expected: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, sid or "", cid or "", str(expected)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        self.expect("ready")

    def expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        assert line == word, f"client said {line!r}, wanted {word!r}; stderr: {self.proc.stderr.read()}"

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=180)
        assert self.proc.returncode == 0, f"client failed:\n{out[-2000:]}\n{err[-4000:]}"
        return json.loads(out.strip().splitlines()[-1])


def split(envelopes: list[dict[str, Any]]):
    """(events, trickle sink loss reports, forwarder loss reports)."""
    events, runner_reports, python_reports = [], [], []
    for e in envelopes:
        if e["data"]["type"] != "telemetry_dropped":
            events.append(e)
        elif e["data"].get("sink") == "python":
            python_reports.append(e)
        else:
            runner_reports.append(e)
    return events, runner_reports, python_reports


def check_annotations(e: dict[str, Any]) -> None:
    """The client's annotations, inside `data` (spec)."""
    assert e["data"]["relayed_via"] == "trickle", e
    assert e["data"]["relay_received_timestamp"].isdigit(), e
    assert int(e["data"]["relay_received_timestamp"]) >= int(e["timestamp"])
    assert "relayed_via" not in e


def run_runner(url: str, sid: str, cid: str, client: Client, publish, maxsize: int = 256,
               end_channel: bool = False):
    """Installs a TrickleEventsSink, waits until the client got a first event, runs `publish`,
    closes the sink (flush and final report; the channel is left open for a client that counts
    to the end, so that a reader still behind is not cut by its deletion); returns the stats."""
    sink = TrickleEventsSink(url, maxsize, session_id=sid, connection_id=cid)
    set_telemetry_sink(sink)
    publish_event("session_created", session_id=sid, connection_id=cid, metadata={"t": -1, "i": 0})
    client.expect("first")
    publish()
    final = sink.close(timeout=30.0, end_channel=end_channel)
    assert final["timed_out"] is False and "channel_error" not in final, final
    return final


def test_relay_8_threads_every_event_accounted_for(channel):
    url, sid, cid = channel(), str(uuid.uuid4()), str(uuid.uuid4())
    n_threads, per_thread = 8, 500
    client = Client(url, sid, cid, expected=n_threads * per_thread + 1)

    def publish():
        def work(t: int) -> None:
            for i in range(per_thread):
                kind = "pipeline_loaded" if i % 10 == 0 else "stream_heartbeat"
                publish_event(kind, session_id=sid, connection_id=cid, metadata={"t": t, "i": i})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    final = run_runner(url, sid, cid, client, publish)
    result = client.result()
    events, runner_reports, python_reports = split(result["envelopes"])
    published = {(-1, 0)} | {(t, i) for t in range(n_threads) for i in range(per_thread)}
    keys = [(e["data"]["t"], e["data"]["i"]) for e in events]
    assert len(keys) == len(set(keys)), "an event arrived twice"
    assert set(keys) <= published
    dropped_reported = sum(r["data"]["dropped"] for r in runner_reports)
    dropped_forwarder = sum(r["data"]["dropped"] for r in python_reports)
    # Every event: delivered, or dropped and reported downstream.
    assert len(keys) + dropped_reported + dropped_forwarder == len(published)
    assert final["emitted"] == len(published)
    assert final["delivered"] == len(keys) + dropped_forwarder
    assert final["dropped_high"] + final["dropped_low"] == dropped_reported
    assert final["dropped_high"] == 0, "a lifecycle event was shed before the heartbeats"
    stats = result["stats"]
    assert stats["relayed"] == len(result["envelopes"]) - len(python_reports) + dropped_forwarder
    assert stats["rejected_foreign"] == 0 and stats["rejected_invalid"] == 0 and stats["bad_lines"] == 0
    assert stats["dropped_reported"] == dropped_reported
    for e in events + runner_reports:
        assert e["data"]["session_id"] == sid and e["data"]["connection_id"] == cid
        check_annotations(e)


def test_burst_overflow_reports_every_drop_downstream(channel):
    url, sid, cid = channel(), str(uuid.uuid4()), str(uuid.uuid4())
    total = 100_000
    client = Client(url, sid, cid, expected=total + 1)

    def publish():
        for i in range(total):
            if i % 1000 == 0:
                publish_event("pipeline_loaded", session_id=sid, metadata={"t": 0, "i": i})
            else:
                publish_event("stream_heartbeat", session_id=sid, metadata={"t": 0, "i": i})

    final = run_runner(url, sid, cid, client, publish, maxsize=64)
    result = client.result()
    events, runner_reports, python_reports = split(result["envelopes"])
    keys = {(e["data"]["t"], e["data"]["i"]) for e in events}
    assert len(keys) == len(events)
    dropped = sum(r["data"]["dropped"] for r in runner_reports) + sum(
        r["data"]["dropped"] for r in python_reports
    )
    assert len(events) + dropped == total + 1
    assert final["dropped_low"] > 0, "the burst did not overflow the queue"
    assert final["dropped_high"] == 0
    lifecycle = {i for (_, i) in keys if i % 1000 == 0}
    assert lifecycle == set(range(0, total, 1000)), "a lifecycle event was lost in the burst"
    assert final["reports"] == len(runner_reports) >= 1


def test_closing_the_sink_ends_the_channel_and_the_relay(channel):
    url, sid, cid = channel(), str(uuid.uuid4()), str(uuid.uuid4())
    client = Client(url, sid, cid)  # reads until the channel ends

    def publish():
        for i in range(20):
            publish_event("stream_heartbeat", session_id=sid, metadata={"t": 0, "i": i})

    final = run_runner(url, sid, cid, client, publish, end_channel=True)
    result = client.result()
    events, _, _ = split(result["envelopes"])
    assert final["delivered"] == 21 and final["dropped_low"] == 0
    assert len(events) == 21
    assert result["stats"]["events_ended"] is True


def test_python_sink_receives_envelopes_byte_for_byte(channel):
    url, sid, cid = channel(), str(uuid.uuid4()), str(uuid.uuid4())
    built: list[dict[str, Any]] = []
    client = Client(url, sid, cid, expected=51)

    def publish():
        for i in range(50):
            env = build_event_envelope(
                "stream_heartbeat" if i % 2 else "error",
                session_id=sid,
                connection_id=cid,
                pipeline_ids=["p-1", "p-ü"],
                user_id="user \"quoted\" \\ \u2603",
                error={"message": "boom", "error_type": "media_input_loop_failed", "recoverable": False},
                metadata={"t": 0, "i": i, "fps_out": 29.97 + i, "big": 2**62, "neg": -5,
                          "nested": {"z": [1, {"b": None, "a": True}], "a": "x\ny"}, "emoji": "🎥"},
                connection_info={"gpu_type": "H100", "fal_region": "us", "fal_runner_id": "r",
                                 "fal_log_labels": {"k": "v"}},
            )
            built.append(env)
            publish_raw_event(env)

    run_runner(url, sid, cid, client, publish)
    result = client.result()
    got = {e["id"]: e for e in result["envelopes"]}
    for env in built:
        assert env["id"] in got
        received = got[env["id"]]
        check_annotations(received)
        assert canonical(strip_annotations(received)) == canonical(env)


async def write_messages(url: str, messages: list[dict[str, Any]], relay: EventsRelay) -> None:
    """Scope's own writer (livepeer_gateway) as the runner: the messages, then the end of the
    channel once the relay has read them all (deleting a channel cuts a reader still behind it:
    trickle's semantics, RELIABILITY.md)."""
    writer = JSONLWriter(url)
    for m in messages:
        await writer.write(m)
    deadline = time.monotonic() + 30
    while True:
        s = relay.stats()
        if s["messages_received"] + s["telemetry_received"] == len(messages):
            break
        assert time.monotonic() < deadline, f"the relay did not read every message: {s}"
        await asyncio.sleep(0.01)
    await writer.close()


RUNNER_MESSAGES = [
    {"type": "runner_ready", "runner_job_id": "job-1"},
    {"type": "notification", "payload": {"kind": "toast", "text": "hi"}},
    {"type": "logs", "lines": ["2026-01-01 - scope - ERROR - boom", "plain line"]},
    {"type": "pong", "request_id": "r0", "timestamp": 1700000000000},
    {"type": "api_response", "request_id": "r1", "status": 200, "data": {"ok": True}},
    {"type": "stream_started", "request_id": "r2", "channels": [
        {"url": "http://x/in", "direction": "in", "mime_type": "video/MP2T", "role": "input"},
        {"url": "http://x/out", "direction": "out", "mime_type": "video/MP2T", "role": "output"}]},
    {"type": "error", "request_id": "r3", "error": "Unknown message type: nope"},
    {"type": "stream_stopped", "request_id": "r4"},
    {"type": "parameters_ack", "status": "ok"},
    {"type": "some_future_type", "x": [1, 2]},
]


def telemetry_lines(sid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ours = build_event_envelope("stream_started", session_id=sid, metadata={"n": 1})
    foreign = build_event_envelope("stream_started", session_id="someone-else")
    return [{"type": "telemetry", "event": ours}, {"type": "telemetry", "event": foreign}], [ours]


def test_every_other_message_is_handed_to_python_sync(channel):
    url, sid = channel(), str(uuid.uuid4())
    sink = Collector()
    set_telemetry_sink(sink)
    relay = EventsRelay(url, session_id=sid)
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend(relay))
    reader.start()
    tele, ours = telemetry_lines(sid)
    asyncio.run(write_messages(url, RUNNER_MESSAGES[:3] + tele + RUNNER_MESSAGES[3:], relay))
    reader.join(timeout=30)
    assert not reader.is_alive(), "iteration did not end with the channel"
    assert got == RUNNER_MESSAGES
    wait_for(lambda: len(sink.events) == 1, what="the relayed envelope")
    assert canonical(strip_annotations(sink.events[0])) == canonical(ours[0])
    stats = relay.close()
    assert stats["rejected_foreign"] == 1 and stats["relayed"] == 1
    assert stats["messages_received"] == len(RUNNER_MESSAGES) and stats["messages_pending"] == 0
    assert stats["unknown_messages"] == 1


def test_every_other_message_is_handed_to_python_async(channel):
    url, sid = channel(), str(uuid.uuid4())
    sink = Collector()
    set_telemetry_sink(sink)
    tele, _ = telemetry_lines(sid)

    async def main() -> tuple[list[dict[str, Any]], int]:
        relay = EventsRelay(url, session_id=sid)
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async def consume() -> list[dict[str, Any]]:
            out = []
            async with relay:
                async for m in relay:
                    out.append(m)
            done.set()
            return out

        tick = asyncio.create_task(ticker())
        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.2)  # the consumer waits here with nothing to read
        waiting_ticks = ticks
        await write_messages(url, tele + RUNNER_MESSAGES, relay)
        got = await asyncio.wait_for(consumer, 30)
        await tick
        return got, waiting_ticks

    got, waiting_ticks = asyncio.run(main())
    assert got == RUNNER_MESSAGES
    # Blocked, the ticker could not have run at all while the consumer waited.
    assert waiting_ticks > 5, "the event loop was blocked while the relay waited"
    wait_for(lambda: len(sink.events) == 1, what="the relayed envelope")


def test_cancelled_anext_loses_nothing(channel):
    url = channel()

    async def main() -> list[dict[str, Any]]:
        relay = EventsRelay(url)
        for _ in range(5):
            try:
                await asyncio.wait_for(relay.__anext__(), 0.02)
            except asyncio.TimeoutError:
                pass
        await write_messages(url, RUNNER_MESSAGES, relay)

        async def drain() -> list[dict[str, Any]]:
            return [m async for m in relay]

        out = await asyncio.wait_for(drain(), 30)
        relay.close()
        return out

    assert asyncio.run(main()) == RUNNER_MESSAGES


def test_the_gil_is_released_while_waiting(channel):
    url = channel()
    relay = EventsRelay(url)
    ended = threading.Event()

    def read() -> None:
        for _ in relay:
            pass
        ended.set()

    reader = threading.Thread(target=read)
    reader.start()
    # While the reader waits for a message, this thread keeps running Python code.
    start, spins = time.monotonic(), 0
    while time.monotonic() - start < 0.3:
        spins += 1
    assert spins > 10_000
    stats = relay.close()
    assert wait_for(ended.is_set, what="iteration to stop after close()")
    reader.join()
    assert stats["messages_pending"] == 0


def test_close_with_a_control_channel(server, channel):
    events, control = channel(), channel()
    relay = EventsRelay(events, control_url=control)
    t0 = time.monotonic()
    stats = relay.close(timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert stats["telemetry_received"] == 0
    assert relay.close()["telemetry_received"] == 0  # idempotent
    assert list(relay) == []


def test_trickle_sink_close_with_the_server_gone(server, channel):
    url = channel()
    sink = TrickleEventsSink(url)
    set_telemetry_sink(sink)
    server.close()
    for i in range(10):
        publish_event("stream_heartbeat", metadata={"i": i})
    t0 = time.monotonic()
    final = sink.close(timeout=1.0)
    # The channel cannot be ended (the writer keeps retrying in the background): close() gives
    # up at its timeout instead of blocking the caller.
    assert time.monotonic() - t0 < 3
    assert final["timed_out"] is True
    # Nothing vanished: every event is delivered to the writer, dropped or queued, all counted.
    accounted = final["delivered"] + final["dropped_high"] + final["dropped_low"] + final["queued"]
    assert final["emitted"] == 10 == accounted
    publish_event("after_close")
    assert trickle_relay.get_telemetry_sink().stats()["emitted"] == 11
