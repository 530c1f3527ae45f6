"""A client shaped like Daydream Scope's LivepeerClient, driving a runner over trickle.

Run by crates/trickle-relay/tests/scope_interop.rs with the venv that scripts/python-env.sh makes
(livepeer-gateway from PyPI). It uses the gateway's own classes the way Scope's client does:
JSONLWriter on the control channel, JSONLReader on the events channel (5 MiB per event), requests
matched to answers by request_id, start_stream waiting 10 s for `stream_started` with a `channels`
list holding an `in` and an `out`. Media goes to `in` with the gateway's TricklePublisher and is
read back from `out` with its TrickleSubscriber.

Usage: scope_client.py CONTROL_URL EVENTS_URL SEGMENTS SEGMENT_BYTES [BIG_SEGMENT_BYTES]
(with BIG_SEGMENT_BYTES, one more segment of that size goes through last: the runner must pass it
on without holding it whole).
Prints one JSON object (what it saw) on stdout; exits 1 with the reason on stderr if any answer
is not what the spec says.
"""

import asyncio
import json
import sys
import time
import uuid

import aiohttp
from livepeer_gateway.channel_reader import JSONLReader
from livepeer_gateway.channel_writer import JSONLWriter
from livepeer_gateway.trickle_publisher import TricklePublisher
from livepeer_gateway.trickle_subscriber import TrickleSubscriber

MAX_EVENT_BYTES = 5 * 1024 * 1024  # Scope's MAX_EVENT_BYTES


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)


class Client:
    def __init__(self, control_url, events_url):
        self.control = JSONLWriter(control_url)
        self.events_url = events_url
        self.pending = {}
        self.ready = asyncio.Event()
        self.unmatched = []
        self.telemetry = 0
        self.telemetry_types = []
        self.numbered = 0
        self.bad_telemetry = []
        self.task = asyncio.create_task(self.events_loop())

    async def events_loop(self):
        # Scope's _events_loop: answers complete pending requests by request_id.
        async for event in JSONLReader(self.events_url)(max_event_bytes=MAX_EVENT_BYTES):
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            request_id = event.get("request_id")
            future = self.pending.pop(request_id, None) if request_id is not None else None
            if future is not None:
                if not future.done():
                    future.set_result(event)
                continue
            if kind == "runner_ready":
                self.ready.set()
            elif kind == "telemetry":
                # The seed's _events_loop branch: the envelope is event["event"], republished as
                # it is; other members of the line (our runner's `seq`) are not looked at.
                envelope = event.get("event")
                if isinstance(envelope, dict) and envelope.get("id") and isinstance(envelope.get("data"), dict):
                    self.telemetry += 1
                    self.telemetry_types.append(envelope["data"].get("type"))
                    self.numbered += "seq" in event
                else:
                    self.bad_telemetry.append(event)
            elif kind in {"api_response", "stream_started", "error", "parameters_ack", "pong", "stream_stopped"}:
                self.unmatched.append(event)

    async def request(self, message, timeout):
        request_id = str(uuid.uuid4())
        message = {**message, "request_id": request_id}
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await self.control.write(message)
        try:
            return await asyncio.wait_for(future, timeout=timeout)
        except TimeoutError:
            self.pending.pop(request_id, None)
            raise Failed(f"no answer to {message['type']} within {timeout}s") from None


def media_channels(response):
    # Scope's start_media: the list must be there, with an `in` and an `out`.
    channels = response.get("channels")
    check(isinstance(channels, list), f"stream_started response missing channels list: {response}")
    input_url = output_url = None
    for channel in channels:
        if not isinstance(channel, dict):
            continue
        url, direction = channel.get("url"), channel.get("direction")
        if not isinstance(url, str) or not isinstance(direction, str):
            continue
        if direction == "in":
            check(channel.get("role") == "input" and channel.get("input_track_index") == 0, f"in channel shape: {channel}")
            check(channel.get("mime_type") == "video/MP2T", f"in channel mime type: {channel}")
            input_url = url
        elif direction == "out":
            check(channel.get("role") == "output" and channel.get("output_track_index") == 0, f"out channel shape: {channel}")
            check(channel.get("mime_type") == "video/MP2T", f"out channel mime type: {channel}")
            output_url = url
    check(input_url and output_url, f"stream_started response missing in/out channels: {channels}")
    return input_url, output_url


def segment(n, size):
    # MPEG-TS shaped: 188-byte packets starting with the 0x47 sync byte, payload varying per segment.
    out = bytearray()
    packet = 0
    while len(out) < size:
        out += bytes([0x47, 0x01, 0x00, 0x10 | (packet % 16)])
        out += bytes(((n * 131 + packet * 7 + i) % 251) for i in range(184))
        packet += 1
    return bytes(out[:size])


async def read_segments(url, count):
    got = []
    subscriber = TrickleSubscriber(url, start_seq=0, max_bytes=64 * 1024 * 1024)
    try:
        while len(got) < count:
            seg = await subscriber.next()
            if seg is None:
                break
            reader = seg.make_reader()
            parts = []
            while True:
                chunk = await reader.read()
                if not chunk:
                    break
                parts.append(chunk)
            await seg.close()
            got.append((seg.seq(), b"".join(parts)))
    finally:
        await subscriber.close()
    return got


async def status_of(url):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/next") as response:
            return response.status


async def main():
    control_url, events_url, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    big = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    client = Client(control_url, events_url)
    report = {}
    await asyncio.wait_for(client.ready.wait(), timeout=30)

    started = await client.request({"type": "start_stream", "params": {}}, timeout=10.0)
    check(started.get("type") == "stream_started", f"start_stream answered {started}")
    input_url, output_url = media_channels(started)
    report["channels"] = started["channels"]

    # Media: published to `in` with the gateway's publisher, read back from `out` byte for byte.
    sent = [segment(n, size + n * 1000) for n in range(count)]
    if big:
        sent.append((bytes([0x47]) + bytes(range(187))) * (big // 188))
        count += 1
    reader = asyncio.create_task(read_segments(output_url, count))
    publisher = TricklePublisher(input_url, "video/MP2T")
    for data in sent:
        writer = await publisher.next()
        await writer.write(data)
        await writer.close()
    got = await asyncio.wait_for(reader, timeout=30)
    check(len(got) == count, f"{len(got)} of {count} segments came back")
    for n, (seq, data) in enumerate(got):
        check(seq == n, f"output segment {n} has seq {seq}")
        check(data == sent[n], f"output segment {n}: {len(data)} bytes, not the {len(sent[n])} sent")
    report["segments"] = len(got)
    report["bytes"] = sum(len(d) for _, d in got)

    api = await client.request({"type": "api", "method": "GET", "path": "/api/v1/pipeline/status"}, timeout=30.0)
    check(api.get("type") == "api_response" and api.get("status") == 200 and isinstance(api.get("data"), dict), f"api answered {api}")
    missing = await client.request({"type": "api", "method": "GET", "path": "/no/such/route"}, timeout=30.0)
    check(missing.get("type") == "api_response" and missing.get("status") == 404 and "data" in missing, f"api 404 answered {missing}")

    ack = await client.request({"type": "parameters", "params": {"prompt": "a cat"}}, timeout=10.0)
    check(ack.get("type") == "parameters_ack" and ack.get("status") == "ok", f"parameters answered {ack}")
    bad = await client.request({"type": "parameters", "params": "not an object"}, timeout=10.0)
    check(bad == {"type": "error", "request_id": bad.get("request_id"), "error": "parameters params must be an object"}, f"bad parameters answered {bad}")

    now = time.time()
    pong = await client.request({"type": "ping", "timestamp": now}, timeout=10.0)
    check(pong.get("type") == "pong" and pong.get("timestamp") == now, f"ping answered {pong}")

    unknown = await client.request({"type": "frobnicate", "x": 1}, timeout=10.0)
    check(unknown == {"type": "error", "request_id": unknown.get("request_id"), "error": "Unknown message type: frobnicate"}, f"unknown type answered {unknown}")

    again = await client.request({"type": "start_stream", "params": {}}, timeout=10.0)
    check(again.get("type") == "stream_started" and again.get("status") == "already_running" and "channels" not in again, f"second start_stream answered {again}")

    # Scope's client sends parameters and stop_stream without a request_id; the answers still come.
    await client.control.write({"type": "parameters", "params": {"strength": 0.5}})
    await client.control.write({"type": "stop_stream"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {e.get("type") for e in client.unmatched} < {"parameters_ack", "stream_stopped"}:
        await asyncio.sleep(0.05)
    kinds = sorted(e.get("type") for e in client.unmatched)
    check(kinds == ["parameters_ack", "stream_stopped"], f"answers without request_id: {client.unmatched}")
    check(all(e.get("request_id") is None for e in client.unmatched), f"request_id of unmatched: {client.unmatched}")

    # Stopping deletes the media channels.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (await status_of(input_url), await status_of(output_url)) != (404, 404):
        await asyncio.sleep(0.05)
    check((await status_of(input_url), await status_of(output_url)) == (404, 404), "media channels still there after stop_stream")

    stopped = await client.request({"type": "stop_stream"}, timeout=10.0)
    check(stopped == {"type": "stream_stopped", "request_id": stopped.get("request_id")}, f"stop_stream answered {stopped}")
    no_stream = await client.request({"type": "parameters", "params": {}}, timeout=10.0)
    check(no_stream.get("type") == "error" and no_stream.get("error") == "No active stream", f"parameters without a stream answered {no_stream}")

    await publisher.close()
    report["telemetry_lines"] = client.telemetry
    report["telemetry_types"] = client.telemetry_types
    report["telemetry_numbered"] = client.numbered
    check(not client.bad_telemetry, f"telemetry lines without an envelope: {client.bad_telemetry[:3]}")
    await client.control.close()
    client.task.cancel()
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
