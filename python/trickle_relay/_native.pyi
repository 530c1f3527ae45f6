"""Type stubs of the native module (``trickle_relay._native``); see ``trickle_relay``'s docs."""

from typing import Any, Iterator

DEFAULT_QUEUE_MAXSIZE: int

def build_event_envelope(
    event_type: str,
    session_id: str | None = None,
    connection_id: str | None = None,
    pipeline_ids: list[str] | None = None,
    user_id: str | None = None,
    error: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    connection_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the structured event envelope, stamped once, exactly as publish_event sends it."""

def publish_event(
    event_type: str,
    session_id: str | None = None,
    connection_id: str | None = None,
    pipeline_ids: list[str] | None = None,
    user_id: str | None = None,
    error: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    connection_info: dict[str, Any] | None = None,
) -> None:
    """Publish an event through the installed sink. Never blocks, never raises for its content."""

def publish_raw_event(event: dict[str, Any]) -> None:
    """Publish an already-built envelope verbatim through the installed sink."""

def set_telemetry_sink(sink: Any | None) -> None:
    """Set (or clear, with None) the active sink: one of ours, or any object with emit(event)."""

def get_telemetry_sink() -> Any | None:
    """The active telemetry sink, or None."""

def install_default_egress_sink() -> bool:
    """Install the egress sink the environment selects (log, HTTP reporter, Kafka)."""

def telemetry_enabled() -> bool:
    """False when SCOPE_TELEMETRY_DISABLED (or DO_NOT_TRACK) opts out."""

def stats() -> dict[str, Any]:
    """Module counters: published, invalid, no_sink, opted_out, sink_errors, sink."""

def _shutdown() -> None: ...

class TrickleEventsSink:
    """Forward telemetry onto a trickle events channel (bounded queue, Rust drain thread)."""

    def __init__(
        self,
        events_url: str,
        maxsize: int = 256,
        *,
        session_id: str | None = None,
        connection_id: str | None = None,
    ) -> None: ...
    def emit(self, event: dict[str, Any]) -> None:
        """Queue one envelope dict. Never blocks."""
    def stats(self) -> dict[str, int]:
        """emitted, delivered, dropped_high, dropped_low, queued, reports, write_errors, lines_lost."""
    def close(self, timeout: float = 5.0, *, end_channel: bool = True) -> dict[str, Any]:
        """Deliver what is queued and a final loss report, end the channel; the final stats."""
    @property
    def events_url(self) -> str: ...
    @property
    def maxsize(self) -> int: ...

class LogSink:
    """Log each event as one TELEMETRY line to the logger trickle_relay.telemetry."""

    def __init__(self) -> None: ...
    def emit(self, event: dict[str, Any]) -> None: ...
    def stats(self) -> dict[str, int]: ...

class MetricsReporter:
    """The crash-safe HTTP metrics reporter (POST /v1/metrics), configured from the environment."""

    def __init__(self, api_key: str | None = None, url: str | None = None) -> None: ...
    def emit(self, event: dict[str, Any]) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def update_api_key(self, api_key: str) -> None: ...
    def flush(self, timeout: float = 5.0) -> str:
        """'drained', 'paused' or 'timed_out'."""
    def close(self, timeout: float = 5.0) -> dict[str, Any]: ...

class KafkaSink:
    """The Kafka sink (disk-buffered, idempotent producer), configured from the environment."""

    def __init__(self) -> None: ...
    def emit(self, event: dict[str, Any]) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self, timeout: float = 5.0) -> dict[str, Any]: ...

class EventsRelay:
    """The client's events loop on a Rust thread; non-telemetry messages come to Python."""

    def __init__(
        self,
        events_url: str,
        control_url: str | None = None,
        session_id: str | None = None,
        connection_id: str | None = None,
    ) -> None: ...
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self, timeout: float | None = None) -> dict[str, Any]: ...
    @property
    def events_url(self) -> str: ...
    def _try_next(self) -> dict[str, Any] | None: ...
    def _finished(self) -> bool: ...
    def _wake_fd(self) -> int: ...
    def _arm(self) -> None: ...
    def _drain_wake(self) -> None: ...

class TrickleServer:
    """This project's trickle server, in process (tests, local runs)."""

    def __init__(self, listen: str = "127.0.0.1:0") -> None: ...
    @property
    def url(self) -> str: ...
    def create_channel(self, name: str) -> str: ...
    def close(self) -> None: ...
