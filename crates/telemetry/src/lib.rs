//! Telemetry for trickle-relay: the envelope, the sink contract, the sinks, drop accounting and
//! egress selection.
//!
//! # The path of one event
//!
//! ```text
//! RUNNER                                              CLIENT
//! publish_event("stream_started", fields)             events channel reader
//!   -> Envelope::new: id + time stamped ONCE            line {"type":"telemetry","seq":N,"event":{..}}
//!   -> installed Sink::emit (never blocks)              -> RawEnvelope::parse (exact bytes kept)
//!      = TrickleEventsSink                              -> annotate_relay("trickle", now) in data
//!        -> bounded two-class queue (drops counted)     -> publish_raw_event -> egress Sink::emit
//!        -> drain task: serialize, batch, write            = LogSink | HTTP reporter | Kafka
//!        -> {"type":"telemetry","seq":N,"event":{..}}     (chosen by egress::select)
//!           lines + telemetry_dropped loss reports
//!        <- telemetry_flow {read_seq} (flow control)
//!   ==== trickle events channel (JSONL over HTTP) ====>
//! ```
//!
//! 1. Where the event happens, [`publish_event`] stamps an [`Envelope`] (uuid v4, unix-ms timestamp)
//!    and hands it to the process-wide [`Sink`] ([`install_sink`]). Nothing is serialized on the
//!    caller's thread; the call costs well under a microsecond, and nothing at all without a sink.
//! 2. On the runner that sink is a [`sinks::TrickleEventsSink`]: a bounded queue
//!    ([`queue`]; 256 events; heartbeats are shed before lifecycle events) drained by a task that
//!    writes JSONL lines to the session's events writer, numbering them (`seq`, so the client can
//!    count what it did not receive), reports its own losses in-band as `telemetry_dropped`
//!    envelopes, and holds to the budget the client's reading implies ([`flow`]).
//! 3. The client parses each forwarded envelope as a [`RawEnvelope`] (the exact bytes plus the few
//!    fields sinks route on), adds `data.relayed_via = "trickle"` and `data.relay_received_timestamp`
//!    (spliced into `data`, without touching any other byte, as the seed's client does), and
//!    re-publishes it with [`publish_raw_event`] through the egress sink picked by
//!    [`egress::select`].
//!
//! Origin id, timestamps, session and connection ids are never re-stamped by a later hop.
//! Telemetry can be turned off with `SCOPE_TELEMETRY_DISABLED=1` or `DO_NOT_TRACK=1`
//! ([`egress::telemetry_enabled_from_env`], [`set_telemetry_enabled`]).

#![warn(missing_docs)]

pub mod api_event;
pub mod egress;
pub mod envelope;
pub mod flow;
pub mod output;
pub mod priority;
pub mod queue;
pub mod sink;
pub mod sinks;

pub use egress::{select, select_from_env, telemetry_enabled_from_env, Egress};
pub use envelope::{
    now_ms, Envelope, EnvelopeError, ErrorInfo, Event, Fields, RawEnvelope, RESERVED_DATA_KEYS,
};
pub use output::{LineOutput, OutputError};
pub use priority::Priority;
pub use sink::{
    install_sink, installed_sink, publish, publish_event, publish_raw_event, set_telemetry_enabled,
    telemetry_enabled, Sink, SinkGuard, SinkStats,
};
