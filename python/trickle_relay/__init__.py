"""Daydream Scope's telemetry API, with trickle-relay's Rust core underneath.

The names, signatures and semantics are those of Scope's ``scope.server.kafka_publisher`` and
``scope.cloud.trickle_events_sink``, so switching is an import change::

    from trickle_relay import (
        publish_event, publish_raw_event, build_event_envelope,
        set_telemetry_sink, get_telemetry_sink, install_default_egress_sink,
        TrickleEventsSink, LogSink, MetricsReporter, KafkaSink, EventsRelay,
    )

Runner (the GPU side): install a ``TrickleEventsSink`` on the session's events channel and publish::

    set_telemetry_sink(TrickleEventsSink(events_url, session_id=sid, connection_id=cid))
    publish_event("stream_heartbeat", session_id=sid, metadata={"fps_out": 29.97})
    ...
    get_telemetry_sink().close(timeout=5.0)   # flushes what is queued, ends the channel

``publish_event`` never blocks and never raises for what an event carries: the envelope is
stamped once (uuid4 id, unix-ms timestamp) and queued for a Rust thread that writes it to the
channel. When the queue (``maxsize``, 256) is full, heartbeats are dropped before lifecycle and
error events, and every drop is reported downstream as a ``telemetry_dropped`` event.

Client (the local side): install the egress sink chosen by the environment, then run the events
loop; telemetry is re-published through the installed sink, everything else comes to you::

    install_default_egress_sink()   # LogSink / MetricsReporter / KafkaSink, as Scope chooses
    relay = EventsRelay(events_url, session_id=sid, connection_id=cid)
    async for msg in relay:          # or: for msg in relay
        dispatch(msg)                # runner_ready, stream_started, api_response, ...
    relay.close()

Any object with an ``emit(event: dict)`` method can be installed as the sink (Scope's
``TelemetrySink`` protocol); it receives envelopes as dicts. ``SCOPE_TELEMETRY_DISABLED=1`` or
``DO_NOT_TRACK=1`` turns all of it off, whatever sink is installed.

Rust log records go to Python's ``logging`` under ``trickle_relay.*`` (the log sink's lines under
``trickle_relay.telemetry``); ``TRICKLE_RELAY_LOG`` (default ``info``) filters them at the source.
"""

from __future__ import annotations

import asyncio
import atexit
from typing import Any, Protocol, runtime_checkable

from . import _native
from ._native import (
    DEFAULT_QUEUE_MAXSIZE,
    KafkaSink,
    LogSink,
    MetricsReporter,
    TrickleEventsSink,
    build_event_envelope,
    get_telemetry_sink,
    install_default_egress_sink,
    publish_event,
    publish_raw_event,
    set_telemetry_sink,
    stats,
    telemetry_enabled,
)

__all__ = [
    "DEFAULT_QUEUE_MAXSIZE",
    "EventsRelay",
    "KafkaSink",
    "LogSink",
    "MetricsReporter",
    "TelemetrySink",
    "TrickleEventsSink",
    "build_event_envelope",
    "get_telemetry_sink",
    "install_default_egress_sink",
    "publish_event",
    "publish_raw_event",
    "set_telemetry_sink",
    "stats",
    "telemetry_enabled",
]


@runtime_checkable
class TelemetrySink(Protocol):
    """A destination for telemetry envelopes (Scope's protocol).

    ``emit`` is called with one envelope dict. It should not block and should not raise; an
    exception it raises is counted (``stats()["sink_errors"]``) and swallowed.
    """

    def emit(self, event: dict[str, Any]) -> None: ...


class EventsRelay(_native.EventsRelay):
    __doc__ = _native.EventsRelay.__doc__

    def __init__(
        self,
        events_url: str,
        control_url: str | None = None,
        session_id: str | None = None,
        connection_id: str | None = None,
    ) -> None:
        # The native constructor (__new__) did the work; this gives help() the signature.
        pass

    def __aiter__(self) -> EventsRelay:
        return self

    async def __anext__(self) -> dict[str, Any]:
        """The next message; waits without blocking the event loop. Cancel-safe: a message is
        taken only when it is returned."""
        while True:
            # Arm first, then look: a message that lands in between still writes the wake byte.
            self._arm()
            msg = self._try_next()
            if msg is not None:
                return msg
            if self._finished():
                raise StopAsyncIteration
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            fd = self._wake_fd()

            def _wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(fd, _wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
                self._drain_wake()

    def __enter__(self) -> EventsRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EventsRelay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)


# Background threads that call into Python stop before the interpreter does.
atexit.register(_native._shutdown)
