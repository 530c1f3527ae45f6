"""A runner shaped like Daydream Scope's, sending telemetry over the events channel.

Run by crates/trickle-relay/tests/scope_interop.rs with the venv that scripts/python-env.sh makes
(livepeer-gateway from PyPI). It writes what Scope's runner writes, with the gateway's JSONLWriter
(json.dumps per message, default separators): `runner_ready`, then `{"type": "telemetry",
"event": <envelope>}` for envelopes built as Scope's build_event_envelope builds them (stamped
once: uuid4 id, unix-ms timestamps as strings, data with type/client_source/timestamp, the
optional fields, metadata merged in), then closes the writer, which deletes the channel so the
client's events loop ends. It closes when a line arrives on stdin (the test sends one once the
client has egressed every envelope).

Usage: scope_runner.py EVENTS_URL MANIFEST_PATH
Writes MANIFEST_PATH: one line per envelope, exactly the JSON text the runner sent for it.
"""

import asyncio
import json
import sys
import time
import uuid

from livepeer_gateway.channel_writer import JSONLWriter


def envelope(event_type, *, session_id=None, connection_id=None, pipeline_ids=None, user_id=None,
             error=None, metadata=None, connection_info=None):
    # Scope's build_event_envelope: optional fields only when set, metadata merged into data.
    timestamp_ms = str(int(time.time() * 1000))
    data = {"type": event_type, "client_source": "scope", "timestamp": timestamp_ms}
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
    return {"id": str(uuid.uuid4()), "type": "stream_trace", "timestamp": timestamp_ms, "data": data}


def events(session, connection):
    info = {"gpu_type": "GPU-H100", "fal_region": "unknown", "fal_runner_id": "r-1", "fal_log_labels": {"a": [1, 2]}}
    ids = {"session_id": session, "connection_id": connection, "connection_info": info}
    out = [
        envelope("runner_ready", metadata={"mode": "livepeer", "startup_ms": 1234}),
        envelope("session_created", pipeline_ids=["longlive"], user_id="user-1", metadata={"mode": "livepeer"}, **ids),
        envelope("stream_heartbeat", pipeline_ids=["longlive"], metadata={
            "mode": "local", "frames_in": 300, "frames_out": 299, "fps_in": 29.9, "fps_out": 29.8,
            "elapsed_ms": 10012, "since_last_heartbeat_ms": 10001, "pipeline_fps": 24.3,
            "vram_allocated_mb": 8123.4, "vram_reserved_mb": 9216.0}, **ids),
        envelope("error", error={"error_type": "media_output_loop_failed", "message": "CUDA out of memory \u2013 \u00e9\u00e8 \"quoted\" \\ back",
                                 "exception_type": "RuntimeError", "recoverable": False}, metadata={"mode": "livepeer"}, **ids),
        envelope("stream_stopped", metadata={"nested": {"data": {"}": "{"}, "list": [None, True, 1.5e-7, -0]}}, **ids),
        envelope("session_closed", user_id="user-1", **ids),
    ]
    # A second hop: the annotations already in data are kept, never duplicated.
    forwarded = envelope("playback_ready", **ids)
    forwarded["data"]["relayed_via"] = "trickle"
    forwarded["data"]["relay_received_timestamp"] = "1700000000000"
    out.append(forwarded)
    return out


async def main():
    events_url, manifest_path = sys.argv[1], sys.argv[2]
    session, connection = "sess-py", "conn-py"
    writer = JSONLWriter(events_url)
    await writer.write({"type": "runner_ready", "runner_job_id": None})
    sent = events(session, connection)
    with open(manifest_path, "w") as manifest:
        for event in sent:
            await writer.write({"type": "telemetry", "event": event})
            # The envelope's exact text inside the line the writer sent (same json.dumps settings).
            manifest.write(json.dumps(event) + "\n")
    print("sent", flush=True)
    # The test says when the client has egressed everything; only then does the close delete the
    # channel (a reader that had not connected yet would find it gone).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await writer.close()


if __name__ == "__main__":
    asyncio.run(main())
