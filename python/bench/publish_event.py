"""publish_event from Python: trickle_relay against a pure-Python seed path, side by side.

What is measured, per call, with time.perf_counter_ns() around each call:
- trickle_relay: ``publish_event("stream_heartbeat", session_id=..., connection_id=...,
  pipeline_ids=[...], metadata={10 heartbeat fields})`` into a ``TrickleEventsSink(maxsize=256)``
  writing to a real trickle channel (an in-process ``TrickleServer``);
- seed: the same call into a pure-Python implementation of the seed's path, written from
  shared/spec/telemetry.md: a uuid4 envelope built as a dict, then ``loop.call_soon_threadsafe``
  into an ``asyncio.Queue(256)`` (drop-oldest when full) on an event loop thread, drained to a
  JSONL writer (``json.dumps`` of ``{"type": "telemetry", "event": ...}`` to a file).
Both on 1 and on 4 Python threads (the threads contend for the GIL, as Scope's do), the calls
paced by nothing (flat out): the figures are the per-call cost seen by the caller, median and
p99, and the seed/ours ratio of the medians.

Then a burst: N events (default 100,000) as fast as one thread can publish into a
``TrickleEventsSink(maxsize=256)``; a reader in another process (``EventsRelay`` with a counting
Python sink) accounts for every one: received, or dropped and reported downstream
(``telemetry_dropped``). The seed path's drops in the same burst are counted here too (the seed
only warns once).

    python python/bench/publish_event.py                     # the full run
    python python/bench/publish_event.py --smoke             # a few thousand calls, to check it runs
    python python/bench/publish_event.py --json out.json     # also write the figures as JSON

Figures are only meaningful from a release build of the package (``pip install ./python``) on
a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

import trickle_relay
from trickle_relay.testing import TrickleServer

SID = str(uuid.uuid4())
CID = str(uuid.uuid4())
PIPELINES = ["longlive"]
HEARTBEAT = {
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


class SeedPath:
    """The seed's runner path in pure Python, from the spec (not the seed's code)."""

    def __init__(self, out_path: str, maxsize: int = 256) -> None:
        self.loop = asyncio.new_event_loop()
        self.maxsize = maxsize
        self.dropped = 0
        self.written = 0
        self.out = open(out_path, "w")
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.maxsize)
        self.drain_task = self.loop.create_task(self._drain())
        self.ready.set()
        self.loop.run_forever()

    async def _drain(self) -> None:
        while True:
            event = await self.queue.get()
            if event is None:
                break
            self.out.write(json.dumps({"type": "telemetry", "event": event}) + "\n")
            self.written += 1

    def emit(self, event: dict[str, Any]) -> None:
        def put() -> None:
            try:
                self.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.queue.get_nowait()
                self.dropped += 1
                self.queue.put_nowait(event)

        self.loop.call_soon_threadsafe(put)

    def publish_event(self, event_type: str, session_id=None, connection_id=None,
                      pipeline_ids=None, user_id=None, error=None, metadata=None,
                      connection_info=None) -> None:
        ts = str(int(time.time() * 1000))
        data: dict[str, Any] = {"type": event_type, "client_source": "scope", "timestamp": ts}
        if session_id:
            data["session_id"] = session_id
        if connection_id:
            data["connection_id"] = connection_id
        if pipeline_ids:
            data["pipeline_ids"] = pipeline_ids
        if user_id:
            data["user_id"] = user_id
        if error:
            data["error"] = error
        if connection_info:
            data["connection_info"] = connection_info
        if metadata:
            data.update(metadata)
        self.emit({"id": str(uuid.uuid4()), "type": "stream_trace", "timestamp": ts, "data": data})

    def close(self) -> None:
        done = threading.Event()

        def stop() -> None:
            self.queue.put_nowait(None) if not self.queue.full() else self.drain_task.cancel()
            done.set()

        self.loop.call_soon_threadsafe(stop)
        done.wait()
        time.sleep(0.05)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.out.close()


def timed_calls(publish: Callable[..., None], calls: int, threads: int) -> list[int]:
    """Per-call latencies (ns) of `calls` calls on each of `threads` threads, started together."""
    results: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def work(slot: int) -> None:
        out = results[slot]
        now = time.perf_counter_ns
        start.wait()
        for _ in range(calls):
            t0 = now()
            publish("stream_heartbeat", session_id=SID, connection_id=CID,
                    pipeline_ids=PIPELINES, metadata=HEARTBEAT)
            out.append(now() - t0)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return [x for r in results for x in r]


def summary(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    return {
        "calls": len(ns),
        "median_us": ns[len(ns) // 2] / 1000,
        "p99_us": ns[min(len(ns) - 1, int(len(ns) * 0.99))] / 1000,
        "max_us": ns[-1] / 1000,
        "mean_us": statistics.fmean(ns) / 1000,
    }


READER = r"""
import json, sys, threading, time
import trickle_relay as t
url, expected = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()
counts = {"received": 0, "dropped_runner": 0, "dropped_reader": 0, "reports": 0}
class Sink:
    def emit(self, e):
        with lock:
            if e["data"]["type"] == "telemetry_dropped":
                key = "dropped_reader" if e["data"].get("sink") == "python" else "dropped_runner"
                counts[key] += e["data"]["dropped"]
                counts["reports"] += 1
            else:
                counts["received"] += 1
t.set_telemetry_sink(Sink())
relay = t.EventsRelay(url)
print("ready", flush=True)
deadline = time.monotonic() + 300
while True:
    with lock:
        n = counts["received"] + counts["dropped_runner"] + counts["dropped_reader"]
    if n >= expected or time.monotonic() > deadline:
        break
    time.sleep(0.01)
stats = relay.close()
with lock:
    print(json.dumps({**counts, "accounted": n, "client": stats}))
"""


def burst(server: TrickleServer, n: int) -> dict[str, Any]:
    url = server.create_channel(f"burst-{uuid.uuid4().hex[:8]}")
    reader = subprocess.Popen([sys.executable, "-c", READER, url, str(n)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    sink = trickle_relay.TrickleEventsSink(url, 256, session_id=SID, connection_id=CID)
    trickle_relay.set_telemetry_sink(sink)
    t0 = time.perf_counter()
    for _ in range(n):
        trickle_relay.publish_event("stream_heartbeat", session_id=SID, connection_id=CID,
                                    pipeline_ids=PIPELINES, metadata=HEARTBEAT)
    elapsed = time.perf_counter() - t0
    final = sink.close(timeout=60.0, end_channel=False)
    trickle_relay.set_telemetry_sink(None)
    out, _ = reader.communicate(timeout=320)
    got = json.loads(out.strip().splitlines()[-1])
    return {
        "events": n,
        "offered_per_s": n / elapsed,
        "sink": final,
        "reader": {k: v for k, v in got.items() if k != "client"},
        "every_event_accounted": got["accounted"] == n
        and final["dropped_high"] + final["dropped_low"] == got["dropped_runner"],
    }


def seed_burst(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        seed = SeedPath(os.path.join(d, "seed.jsonl"))
        t0 = time.perf_counter()
        for _ in range(n):
            seed.publish_event("stream_heartbeat", session_id=SID, connection_id=CID,
                               pipeline_ids=PIPELINES, metadata=HEARTBEAT)
        elapsed = time.perf_counter() - t0
        # Let the loop apply every put before counting.
        time.sleep(0.5)
        seed.close()
        return {"events": n, "offered_per_s": n / elapsed, "dropped": seed.dropped,
                "written": seed.written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls per thread per run")
    ap.add_argument("--threads", default="1,4", help="thread counts, comma-separated")
    ap.add_argument("--burst", type=int, default=100_000, help="events in the burst")
    ap.add_argument("--smoke", action="store_true", help="a quick run that checks the bench works")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.smoke:
        args.calls, args.burst = 3_000, 5_000
    threads = [int(t) for t in args.threads.split(",")]

    server = TrickleServer()
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "package": os.path.dirname(trickle_relay.__file__),
        "calls_per_thread": args.calls,
        "runs": [],
    }
    print(f"publish_event: {args.calls} calls per thread, heartbeat with 10 metadata fields")
    print(f"{'impl':<14}{'threads':>8}{'median us':>12}{'p99 us':>10}{'max us':>10}")
    for n in threads:
        row: dict[str, Any] = {"threads": n}
        url = server.create_channel(f"bench-{uuid.uuid4().hex[:8]}")
        sink = trickle_relay.TrickleEventsSink(url, 256, session_id=SID, connection_id=CID)
        trickle_relay.set_telemetry_sink(sink)
        timed_calls(trickle_relay.publish_event, min(args.calls, 2_000), n)  # warm-up
        ours = summary(timed_calls(trickle_relay.publish_event, args.calls, n))
        row["trickle_relay"] = ours
        row["trickle_relay_sink"] = sink.close(timeout=30.0)
        trickle_relay.set_telemetry_sink(None)
        with tempfile.TemporaryDirectory() as d:
            seed = SeedPath(os.path.join(d, "seed.jsonl"))
            timed_calls(seed.publish_event, min(args.calls, 2_000), n)
            theirs = summary(timed_calls(seed.publish_event, args.calls, n))
            seed.close()
        row["seed"] = theirs
        row["median_ratio"] = theirs["median_us"] / ours["median_us"]
        results["runs"].append(row)
        for name, s in (("trickle_relay", ours), ("seed (Python)", theirs)):
            print(f"{name:<14}{n:>8}{s['median_us']:>12.2f}{s['p99_us']:>10.2f}{s['max_us']:>10.1f}")
        print(f"{'':<14}{'':>8}  seed/ours median: {row['median_ratio']:.1f}x")

    b = burst(server, args.burst)
    s = seed_burst(args.burst)
    results["burst"] = {"trickle_relay": b, "seed": s}
    sk, rd = b["sink"], b["reader"]
    print(f"\nburst of {args.burst} heartbeats, one thread, flat out:")
    print(f"  trickle_relay: offered {b['offered_per_s']:,.0f}/s; delivered {sk['delivered']}, "
          f"dropped {sk['dropped_high'] + sk['dropped_low']} (reported downstream: "
          f"{rd['dropped_runner']} in {rd['reports']} reports); reader received {rd['received']}; "
          f"every event accounted for: {b['every_event_accounted']}")
    print(f"  seed (Python): offered {s['offered_per_s']:,.0f}/s; written {s['written']}, "
          f"dropped {s['dropped']} (the seed only warns once)")
    server.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not b["every_event_accounted"]:
        sys.exit("not every event of the burst was accounted for")


if __name__ == "__main__":
    main()
