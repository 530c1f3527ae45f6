//! The client role: the local side of a session, and its single telemetry egress point.
//!
//! The events loop reads the events channel and dispatches every message type of the spec:
//! - `telemetry`: the envelope is checked against this session (a runner must not speak for
//!   another: a foreign `session_id`/`connection_id` is rejected and counted), annotated inside
//!   its `data` with `"relayed_via":"trickle"` and `"relay_received_timestamp":"<unix ms>"` (every
//!   other byte kept; a second hop's annotations are kept, not duplicated) and emitted to the
//!   egress sink;
//!   `telemetry_dropped` envelopes also add their `dropped` count to [`ClientStats`];
//! - `runner_ready` marks the runner ready; `notification` is re-broadcast to local listeners;
//!   `logs` lines are re-emitted as local log records at their parsed level; `pong` logs the
//!   round trip;
//! - `api_response`, `stream_started`, `error` (and `stream_stopped`, `parameters_ack` when they
//!   carry one) complete the pending request with that `request_id`;
//! - anything else is logged at debug level and skipped.
//!
//! The client also pings the runner every 10 s, and exposes requests (`start_stream`,
//! `stop_stream`, `api`...) that wait for their answer with a timeout.
//!
//! A trickle server outage shorter than [`ClientConfig::reconnect_window`] does not end the
//! session: the events subscription reconnects and reads on from where it broke off, and the
//! control publisher re-sends its open segment once the server is back. What the client can see
//! of a gap (reconnects, segments resumed, segments lost mid-way or skipped) is in
//! [`ClientReport`].
//!
//! **Every event accounted for.** A runner of ours numbers its event lines (`seq`); the client
//! follows the numbers ([`transit`]) and turns every gap into a `telemetry_lost_in_transit`
//! envelope downstream (exact count and range), restarts told apart from gaps. It reports the
//! last `seq` it read to the runner (`telemetry_flow {read_seq}` on the control channel, at most
//! every 10 ms, only while lines flow), so the runner keeps it inside the server's window
//! ([`telemetry::flow`]); a runner that answers that with `error` (Scope's) is not sent it again.
//! At the end, with a runner that said `telemetry_flow: true` in `runner_ready`, [`Client::close`]
//! asks it to end (`telemetry_flow {end: true}`) instead of closing the control channel at once,
//! and reads on to its `telemetry_end`, so nothing is cut off by the channel's deletion.
//!
//! Both channels treat an `https://` server's certificate as [`ClientConfig::trickle_tls`] says
//! (see [`trickle::client_tls`]); a refused certificate ends the events loop at once and is kept
//! as [`Client::tls_refused`], so the process can exit with it instead of waiting.

pub mod egress;
pub mod http;
pub mod media;
pub mod transit;

use crate::logtail::parse_level;
use crate::SessionIds;
use bytes::Bytes;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use telemetry::{Envelope, Event, Fields, RawEnvelope, Sink};
use tokio::sync::Notify;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use transit::{Gap, Transit};
use trickle::client_tls::ClientTls;
use trickle::jsonl::{JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions};
use trickle::messages::{
    ApiRequest, ControlMessage, EventMessage, Parameters, Ping, StartStream, StopStream,
};
use trickle::publisher::{Publisher, PublisherOptions};
use trickle::subscriber::{SubscribeError, Subscriber, SubscriberOptions, SubscriberStats};

/// How long `start_stream` waits for `stream_started`: 10 s, as Scope's client.
pub const START_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// How the client is set up.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The control channel URL (the client publishes). Empty: the client only reads the events
    /// channel (no pings; requests fail with [`RequestError::Control`]), for an application that
    /// writes the control channel itself.
    pub control_url: String,
    /// The events channel URL (the client subscribes).
    pub events_url: String,
    /// This session's ids; telemetry claiming others is rejected.
    pub session: SessionIds,
    /// How long a request waits for its answer.
    pub request_timeout: Duration,
    /// How often the client pings the runner.
    pub ping_interval: Duration,
    /// The largest event line accepted on the events channel (the seed's is 5 MiB).
    pub max_event_bytes: usize,
    /// Where the events subscription starts (`-2`: the segment being written now).
    pub events_start_seq: i64,
    /// How long both channels keep reconnecting through a trickle server outage before the
    /// events loop ends; zero: give up after the reference clients' retries (about 2.5 s).
    pub reconnect_window: Duration,
    /// How both channels treat an `https://` server's certificate (default: any is accepted).
    pub trickle_tls: ClientTls,
    /// Local address both channels connect from (`None`: the system's choice); see
    /// [`trickle::publisher::PublisherOptions::local_address`].
    pub local_address: Option<std::net::IpAddr>,
    /// Where every valid events message that is not `telemetry` also goes, as its raw line, after
    /// the client's own dispatch (an embedding application's handlers: the Python package). The
    /// events loop waits while it is full: a consumer that stops reading stalls the loop rather
    /// than losing a message. `None`: nowhere.
    pub messages: Option<tokio::sync::mpsc::Sender<Bytes>>,
}

impl ClientConfig {
    /// A client for these two channels with the seed application's defaults.
    pub fn new(control_url: impl Into<String>, events_url: impl Into<String>) -> ClientConfig {
        ClientConfig {
            control_url: control_url.into(),
            events_url: events_url.into(),
            session: SessionIds::default(),
            request_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(10),
            max_event_bytes: 5 * 1024 * 1024,
            events_start_seq: -2,
            reconnect_window: crate::runner::DEFAULT_RECONNECT_WINDOW,
            trickle_tls: ClientTls::default(),
            local_address: None,
            messages: None,
        }
    }
}

/// Counters of one client, all monotonic.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// `telemetry` messages received.
    pub telemetry_received: AtomicU64,
    /// Envelopes handed to the egress sink.
    pub relayed: AtomicU64,
    /// Envelopes accepted but discarded: no egress sink (none configured, or telemetry opted out).
    pub discarded: AtomicU64,
    /// Envelopes rejected because they claim another session or connection.
    pub rejected_foreign: AtomicU64,
    /// `telemetry` messages whose envelope is not a valid envelope.
    pub rejected_invalid: AtomicU64,
    /// Sum of the `dropped` counts of the runner's `telemetry_dropped` events.
    pub dropped_reported: AtomicU64,
    /// Messages of a type this version does not know, skipped.
    pub unknown_messages: AtomicU64,
    /// Runner log lines re-emitted locally.
    pub log_lines: AtomicU64,
    /// Notifications re-broadcast.
    pub notifications: AtomicU64,
    /// Pongs received.
    pub pongs: AtomicU64,
    /// Requests that got no answer in time.
    pub request_timeouts: AtomicU64,
    /// `telemetry_flow` reports written to the runner.
    pub flow_reports: AtomicU64,
    /// The runner's `telemetry_dropped` envelopes received.
    pub runner_loss_reports: AtomicU64,
}

/// A point-in-time copy of [`ClientStats`] plus what the events reader counted.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClientReport {
    /// `telemetry` messages received.
    pub telemetry_received: u64,
    /// Envelopes handed to the egress sink (or discarded, when there is none).
    pub relayed: u64,
    /// Envelopes accepted but discarded: no egress sink (none configured, or telemetry opted out
    /// by `SCOPE_TELEMETRY_DISABLED` / `DO_NOT_TRACK`).
    pub discarded: u64,
    /// Envelopes claiming another session or connection.
    pub rejected_foreign: u64,
    /// Invalid envelopes.
    pub rejected_invalid: u64,
    /// Drops the runner reported through `telemetry_dropped`.
    pub dropped_reported: u64,
    /// Unknown message types skipped.
    pub unknown_messages: u64,
    /// Bad lines on the events channel (not JSON, not an object, oversized...), skipped.
    pub bad_lines: u64,
    /// Runner log lines re-emitted.
    pub log_lines: u64,
    /// Runner notifications re-broadcast locally.
    pub notifications: u64,
    /// Pongs received (answers to the client's pings).
    pub pongs: u64,
    /// Requests that timed out.
    pub request_timeouts: u64,
    /// Events-channel segments skipped because the subscriber fell out of the server's window
    /// (their events are lost; the runner cannot know).
    pub events_skipped_segments: u64,
    /// Trickle server outages the events subscription reconnected through.
    pub events_reconnects: u64,
    /// Events segments that broke off (server outage) and were read on from where they broke:
    /// nothing of them was lost.
    pub events_resumed_segments: u64,
    /// Events segments that broke off and could not be resumed: the rest of each is lost
    /// (uncountable here; the runner could not see it either).
    pub events_broken_segments: u64,
    /// The runner's loss reports (`telemetry_dropped`) received (counted in `telemetry_received`).
    pub runner_loss_reports: u64,
    /// Event lines the runner wrote that never arrived (gaps in its numbering), exact.
    pub lost_in_transit: u64,
    /// Gaps found (each reported downstream as one `telemetry_lost_in_transit`).
    pub transit_gaps: u64,
    /// New runners seen after the first (numbering restarted: no gap).
    pub runner_restarts: u64,
    /// The runner's loss reports that were lost in transit (their counts came with later ones).
    pub lost_reports: u64,
    /// The last event `seq` read (0: none, or the runner does not number its lines).
    pub read_seq: u64,
    /// The runner announced its end (`telemetry_end`) and this client read it.
    pub runner_ended: bool,
    /// `telemetry_flow` reports written to the runner.
    pub flow_reports: u64,
    /// Origin-to-client latency of relayed envelopes, in ms: median, p99, max.
    pub latency_ms: Option<[u64; 3]>,
    /// The events channel has ended (the runner closed it, or the subscription failed).
    pub events_ended: bool,
    /// The events channel does not exist (404 before the server ever showed it).
    pub events_channel_missing: bool,
}

impl ClientReport {
    /// The runner's events this client can account for: received, reported dropped, or lost in
    /// transit. With a runner of ours, at the end of a session, this equals what its callers
    /// emitted: `emitted = events received + dropped_reported + lost_in_transit` (the runner's
    /// own loss reports are not events, so they are left out).
    pub fn accounted(&self) -> u64 {
        self.telemetry_received
            .saturating_sub(self.runner_loss_reports)
            + self.dropped_reported
            + self.lost_in_transit
    }
}

/// A reader of the latency histogram by bucket ([`Client::latency_probe`]).
pub type LatencyProbe = Arc<dyn Fn(&[u64]) -> LatencyBuckets + Send + Sync>;

/// The latency histogram by bucket, as [`Client::latency_probe`] reads it.
#[derive(Debug, Clone, Default)]
pub struct LatencyBuckets {
    /// Count per bucket (not cumulative); one more than the bounds asked for.
    pub counts: Vec<u64>,
    /// Every value recorded.
    pub count: u64,
    /// Their sum, in ms (from the histogram's mean: within its 3 significant figures).
    pub sum_ms: f64,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No answer within the timeout.
    #[error(
        "no answer from the runner within {0:?}; is the runner subscribed to the control channel?"
    )]
    Timeout(Duration),
    /// The runner answered `error`.
    #[error("the runner answered with an error: {0}")]
    Runner(Value),
    /// The control channel could not be written.
    #[error("cannot write to the control channel: {0}")]
    Control(String),
    /// The client is shutting down.
    #[error("the client closed before the answer arrived")]
    Closed,
    /// The answer came but cannot be used, e.g. `stream_started` without its media channels.
    #[error("{0}")]
    BadAnswer(String),
}

type Pending = Mutex<HashMap<String, oneshot::Sender<EventMessage>>>;

struct Shared {
    session: SessionIds,
    egress: Option<Arc<dyn Sink>>,
    pending: Pending,
    stats: ClientStats,
    /// Bad lines the JSONL reader counted (not JSON, not an object, oversized...).
    bad_lines: AtomicU64,
    /// JSON objects that are not a valid events message (counted with `bad_lines`).
    bad_messages: AtomicU64,
    skipped_segments: AtomicU64,
    /// The events subscriber's counters, as of the last line read.
    subscriber: Mutex<SubscriberStats>,
    latency: Mutex<Histogram<u64>>,
    ready: watch::Sender<Option<u64>>,
    notifications: broadcast::Sender<Value>,
    events_ended: AtomicBool,
    /// The refused certificate that ended the events loop, if that is what ended it.
    tls_refused: Mutex<Option<String>>,
    /// The numbering of the runner's event lines, followed.
    transit: Mutex<Transit>,
    /// The last `seq` read, for the flow reporter.
    read_seq: AtomicU64,
    /// Wakes the flow reporter: a numbered line was read.
    flow_wake: Notify,
    /// The runner said `telemetry_flow: true` in `runner_ready`.
    flow_capable: AtomicBool,
    /// The runner answered a report with `error` (it does not know the message): stop sending.
    flow_refused: AtomicBool,
    /// `telemetry_lost_in_transit` envelopes made.
    lost_reports_made: AtomicU64,
    /// The events channel was never there (see [`Client::events_missing`]).
    events_missing: AtomicBool,
}

/// A connected client: the control writer, the events loop and the pinger.
pub struct Client {
    config: ClientConfig,
    /// `None` when [`ClientConfig::control_url`] is empty (events only).
    control: Option<JsonlWriter>,
    shared: Arc<Shared>,
    events: JoinHandle<()>,
    pinger: Option<JoinHandle<()>>,
}

impl Client {
    /// Connects to both channels and starts the events loop and the pinger.
    ///
    /// `egress` receives every accepted envelope; `None` makes the client count and drop them
    /// (as the seed does when no sink is installed).
    pub fn connect(config: ClientConfig, egress: Option<Arc<dyn Sink>>) -> Client {
        let control = (!config.control_url.is_empty()).then(|| {
            JsonlWriter::new(
                Publisher::new(
                    config.control_url.clone(),
                    PublisherOptions {
                        content_type: "application/jsonl".into(),
                        reconnect_window: config.reconnect_window,
                        tls: config.trickle_tls.clone(),
                        local_address: config.local_address,
                        ..PublisherOptions::default()
                    },
                ),
                JsonlWriterOptions::default(),
            )
        });
        // Constant, valid bounds: 1 ms to 1 h at 3 significant figures.
        let latency = Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds");
        let shared = Arc::new(Shared {
            session: config.session.clone(),
            egress,
            pending: Mutex::new(HashMap::new()),
            stats: ClientStats::default(),
            bad_lines: AtomicU64::new(0),
            bad_messages: AtomicU64::new(0),
            skipped_segments: AtomicU64::new(0),
            subscriber: Mutex::new(SubscriberStats::default()),
            latency: Mutex::new(latency),
            ready: watch::channel(None).0,
            notifications: broadcast::channel(256).0,
            events_ended: AtomicBool::new(false),
            tls_refused: Mutex::new(None),
            transit: Mutex::new(Transit::default()),
            read_seq: AtomicU64::new(0),
            flow_wake: Notify::new(),
            flow_capable: AtomicBool::new(false),
            flow_refused: AtomicBool::new(false),
            lost_reports_made: AtomicU64::new(0),
            events_missing: AtomicBool::new(false),
        });
        let events = tokio::spawn(events_loop(config.clone(), shared.clone()));
        // Only the events loop holds the message sender: the channel closes when the loop ends.
        let config = ClientConfig {
            messages: None,
            ..config
        };
        let pinger = control.clone().map(|control| {
            let (c, f) = (control.clone(), shared.clone());
            tokio::spawn(async move {
                tokio::join!(ping_loop(control, config.ping_interval), flow_loop(c, f));
            })
        });
        Client {
            config,
            control,
            shared,
            events,
            pinger,
        }
    }

    /// Waits until the runner reported `runner_ready`; returns the `startup_ms` the message carried
    /// (0: Scope's runner, and this one, report the cold start in the telemetry event instead).
    pub async fn wait_ready(&self, timeout: Duration) -> Option<u64> {
        let mut rx = self.shared.ready.subscribe();
        let ready = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(v)) => *v,
            _ => None,
        }
    }

    /// Local listeners of the runner's notifications.
    pub fn notifications(&self) -> broadcast::Receiver<Value> {
        self.shared.notifications.subscribe()
    }

    /// Starts the stream and waits for `stream_started` (at most [`START_STREAM_TIMEOUT`], as
    /// Scope's client, or the request timeout if shorter), which must list the stream's media
    /// channels with an `in` and an `out` (as Scope's client requires), unless it says
    /// `status: "already_running"`. The answer is returned whole (see [`media_channels`]).
    pub async fn start_stream(&self, params: Value) -> Result<EventMessage, RequestError> {
        let request_id = new_request_id();
        let msg = ControlMessage::StartStream(StartStream {
            request_id: request_id.clone(),
            params,
            extra: Map::new(),
        });
        let timeout = self.config.request_timeout.min(START_STREAM_TIMEOUT);
        let answer = self.request_within(request_id, msg, timeout).await?;
        if let EventMessage::StreamStarted(r) = &answer {
            let running = r.extra.get("status").and_then(Value::as_str) == Some("already_running");
            if !running {
                media_channels(&answer).map_err(RequestError::BadAnswer)?;
            }
        }
        Ok(answer)
    }

    /// Stops the stream and waits for `stream_stopped`.
    pub async fn stop_stream(&self) -> Result<EventMessage, RequestError> {
        let request_id = new_request_id();
        let msg = ControlMessage::StopStream(StopStream {
            request_id: Some(request_id.clone()),
            extra: Map::new(),
        });
        self.request(request_id, msg).await
    }

    /// Sends new pipeline parameters (answered by an informational `parameters_ack`).
    pub async fn set_parameters(&self, params: Value) -> Result<(), RequestError> {
        self.send(&ControlMessage::Parameters(Parameters {
            params,
            extra: Map::new(),
        }))
        .await
    }

    /// Calls the runner app's HTTP API and waits for `api_response`.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<EventMessage, RequestError> {
        let request_id = new_request_id();
        let msg = ControlMessage::Api(ApiRequest {
            request_id: request_id.clone(),
            method: method.into(),
            path: path.into(),
            body,
            extra: Map::new(),
        });
        self.request(request_id, msg).await
    }

    /// Sends `msg` and waits for the answer carrying `request_id`.
    pub async fn request(
        &self,
        request_id: String,
        msg: ControlMessage,
    ) -> Result<EventMessage, RequestError> {
        self.request_within(request_id, msg, self.config.request_timeout)
            .await
    }

    /// [`Client::request`], waiting at most `timeout`.
    async fn request_within(
        &self,
        request_id: String,
        msg: ControlMessage,
        timeout: Duration,
    ) -> Result<EventMessage, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().insert(request_id.clone(), tx);
        if let Err(e) = self.send(&msg).await {
            self.shared.pending.lock().remove(&request_id);
            return Err(e);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        match answer {
            Ok(Ok(EventMessage::Error(e))) => Err(RequestError::Runner(Value::Object(e.extra))),
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(RequestError::Closed),
            Err(_) => {
                self.shared.pending.lock().remove(&request_id);
                self.shared.stats.request_timeouts.fetch_add(1, Relaxed);
                Err(RequestError::Timeout(timeout))
            }
        }
    }

    async fn send(&self, msg: &ControlMessage) -> Result<(), RequestError> {
        let Some(control) = &self.control else {
            return Err(RequestError::Control(
                "this client has no control channel (control_url is empty)".into(),
            ));
        };
        control
            .write(msg)
            .await
            .map_err(|e| RequestError::Control(e.to_string()))
    }

    /// The counters so far.
    pub fn report(&self) -> ClientReport {
        self.shared.report()
    }

    /// A cheap handle that reads the counters, for endpoints that outlive a borrow of the client.
    pub fn reporter(&self) -> Arc<dyn Fn() -> ClientReport + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || shared.report())
    }

    /// A cheap handle that reads the origin-to-client latency histogram (the one behind
    /// [`ClientReport::latency_ms`]) as counts per bucket of `bounds_ms` (upper bounds, ascending;
    /// a last bucket holds the rest), with the total count and the sum in ms.
    pub fn latency_probe(&self) -> LatencyProbe {
        let shared = self.shared.clone();
        Arc::new(move |bounds| {
            let h = shared.latency.lock();
            let mut counts = Vec::with_capacity(bounds.len() + 1);
            let mut low = 0;
            for &b in bounds {
                counts.push(if b >= low { h.count_between(low, b) } else { 0 });
                low = b.saturating_add(1);
            }
            counts.push(h.count_between(low, u64::MAX));
            LatencyBuckets {
                counts,
                count: h.len(),
                sum_ms: h.mean() * h.len() as f64,
            }
        })
    }

    /// Whether the events channel has ended (the runner closed it, or it failed).
    pub fn events_ended(&self) -> bool {
        self.shared.events_ended.load(Relaxed)
    }

    /// Why the events channel's server certificate was refused, when that ended the events loop
    /// (the message names the URL, the reason and the flag).
    pub fn tls_refused(&self) -> Option<String> {
        self.shared.tls_refused.lock().clone()
    }

    /// Whether the events loop ended because the events channel does not exist (a 404 before
    /// the server ever showed it), not because it ended: a setup error, not an end of session.
    pub fn events_missing(&self) -> bool {
        self.shared.events_missing.load(Relaxed)
    }

    /// Ends the session: closes the control channel (so the runner stops), then waits up to
    /// `drain` for the runner to flush and close the events channel, and returns the counters.
    ///
    /// With a runner that reads `telemetry_flow` (it said so in `runner_ready`), the client asks
    /// it to end instead and keeps the control channel open meanwhile, so it can tell the runner
    /// it read the last line before the runner deletes the events channel; then it closes control.
    pub async fn close(self, drain: Duration) -> ClientReport {
        let shared = &self.shared;
        let asked = match &self.control {
            Some(control)
                if shared.flow_capable.load(Relaxed)
                    && !shared.flow_refused.load(Relaxed)
                    && !shared.events_ended.load(Relaxed) =>
            {
                let end = serde_json::json!({"type": "telemetry_flow", "read_seq": shared.read_seq.load(Relaxed), "end": true});
                control.write(&end).await.is_ok()
            }
            _ => false,
        };
        let mut events = self.events;
        let drained_early = if asked {
            // The runner ends the events channel once we have read its `telemetry_end`.
            tokio::time::timeout(drain, &mut events).await.is_ok()
        } else {
            false
        };
        if let Some(pinger) = &self.pinger {
            pinger.abort();
        }
        if let Some(control) = &self.control {
            if let Err(e) = control.close().await {
                tracing::warn!(error = %e, "closing the control channel failed");
            }
        }
        if drained_early {
            return self.shared.report();
        }
        if tokio::time::timeout(drain, &mut events).await.is_err() {
            // A zero drain asks to stop reading now: nothing to warn about.
            if !drain.is_zero() {
                tracing::warn!(
                    ?drain,
                    "the events channel did not end in time; stopping the events loop"
                );
            }
            events.abort();
        }
        self.shared.report()
    }
}

/// The `in` and `out` media channel URLs of a `stream_started` answer, checked as Scope's client
/// checks them: a missing list, or one without an `in` or an `out`, is an error.
pub fn media_channels(answer: &EventMessage) -> Result<(String, String), String> {
    let EventMessage::StreamStarted(r) = answer else {
        return Err(format!(
            "expected stream_started, the runner answered {}",
            answer.type_name()
        ));
    };
    let Some(channels) = r.extra.get("channels").and_then(Value::as_array) else {
        return Err("stream_started response missing channels list".into());
    };
    let url_of = |direction: &str| {
        channels.iter().rev().find_map(|c| {
            (c.get("direction").and_then(Value::as_str) == Some(direction))
                .then(|| c.get("url").and_then(Value::as_str))
                .flatten()
                .map(str::to_string)
        })
    };
    match (url_of("in"), url_of("out")) {
        (Some(input), Some(output)) => Ok((input, output)),
        _ => Err("stream_started response missing in/out channels".into()),
    }
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Shared {
    fn report(&self) -> ClientReport {
        let s = &self.stats;
        let latency = {
            let h = self.latency.lock();
            (!h.is_empty()).then(|| [h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()])
        };
        let sub = *self.subscriber.lock();
        let transit = self.transit.lock().clone();
        ClientReport {
            telemetry_received: s.telemetry_received.load(Relaxed),
            relayed: s.relayed.load(Relaxed),
            discarded: s.discarded.load(Relaxed),
            rejected_foreign: s.rejected_foreign.load(Relaxed),
            rejected_invalid: s.rejected_invalid.load(Relaxed),
            dropped_reported: s.dropped_reported.load(Relaxed) + transit.dropped_reported,
            unknown_messages: s.unknown_messages.load(Relaxed),
            bad_lines: self.bad_lines.load(Relaxed) + self.bad_messages.load(Relaxed),
            log_lines: s.log_lines.load(Relaxed),
            notifications: s.notifications.load(Relaxed),
            pongs: s.pongs.load(Relaxed),
            request_timeouts: s.request_timeouts.load(Relaxed),
            events_skipped_segments: self.skipped_segments.load(Relaxed),
            events_reconnects: sub.reconnects,
            events_resumed_segments: sub.resumed_segments,
            events_broken_segments: sub.broken_segments,
            runner_loss_reports: s.runner_loss_reports.load(Relaxed),
            lost_in_transit: transit.lost,
            transit_gaps: transit.gaps,
            runner_restarts: transit.restarts,
            lost_reports: transit.lost_reports,
            read_seq: transit.read_seq(),
            runner_ended: transit.ended,
            flow_reports: s.flow_reports.load(Relaxed),
            latency_ms: latency,
            events_ended: self.events_ended.load(Relaxed),
            events_channel_missing: self.events_missing.load(Relaxed),
        }
    }

    /// Handles one events-channel line (raw bytes from `JsonlReader::next_line`: validated here, once).
    /// Returns the line when it is a valid message other than `telemetry`, for
    /// [`ClientConfig::messages`].
    ///
    /// Fast path: a line exactly as the runner's sink writes it (`{"type":"telemetry","event":E}`)
    /// goes straight to [`Shared::relay_envelope`] with `E` sliced out of the line, without building an
    /// [`EventMessage`] or copying it. Anything else, or an `E` that is not a valid envelope there,
    /// takes the general path, which decides exactly as before.
    fn dispatch_line(&self, line: Bytes) -> Option<Bytes> {
        // The line is raw (the reader checks framing only): each path below validates it, once.
        if let Some((seq, envelope)) = canonical_telemetry(&line) {
            if let Ok(envelope) = RawEnvelope::parse(envelope) {
                self.stats.telemetry_received.fetch_add(1, Relaxed);
                if let Some(seq) = seq {
                    self.numbered(seq);
                }
                self.relay_envelope(envelope);
                return None;
            }
        }
        let msg = std::str::from_utf8(&line)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<EventMessage>(text).map_err(|e| e.to_string()));
        match msg {
            Ok(msg) => {
                let forward = !matches!(msg, EventMessage::Telemetry(_));
                self.dispatch(msg);
                forward.then_some(line)
            }
            Err(e) => {
                let n = self.bad_messages.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(error = %e, bad_messages = n, "events line is not a valid message; skipped");
                }
                None
            }
        }
    }

    /// Handles one events-channel message.
    fn dispatch(&self, msg: EventMessage) {
        match msg {
            EventMessage::Telemetry(t) => {
                if let Some(seq) = t.extra.get("seq").and_then(Value::as_u64) {
                    self.numbered(seq);
                }
                self.relay(Bytes::copy_from_slice(t.event.get().as_bytes()))
            }
            EventMessage::RunnerReady(r) => {
                self.transit.lock().runner_ready();
                let flow = r.extra.get("telemetry_flow").and_then(Value::as_bool) == Some(true);
                self.flow_capable.store(flow, Relaxed);
                // Scope's runner puts its cold start in the `runner_ready` telemetry event only.
                let startup_ms = r.startup_ms.as_ref().and_then(|n| n.as_u64()).unwrap_or(0);
                tracing::info!(
                    job = r.runner_job_id.as_deref().unwrap_or("-"),
                    "runner ready"
                );
                self.ready.send_replace(Some(startup_ms));
            }
            EventMessage::Notification(n) => {
                self.stats.notifications.fetch_add(1, Relaxed);
                // No listener is fine: notifications are best effort locally.
                let _ = self.notifications.send(n.payload);
            }
            EventMessage::Logs(logs) => {
                self.stats
                    .log_lines
                    .fetch_add(logs.lines.len() as u64, Relaxed);
                for line in logs.lines {
                    match parse_level(&line) {
                        tracing::Level::ERROR => tracing::error!(target: "runner", "{line}"),
                        tracing::Level::WARN => tracing::warn!(target: "runner", "{line}"),
                        tracing::Level::DEBUG => tracing::debug!(target: "runner", "{line}"),
                        _ => tracing::info!(target: "runner", "{line}"),
                    }
                }
            }
            EventMessage::Pong(p) => {
                self.stats.pongs.fetch_add(1, Relaxed);
                if let Some(sent) = p.timestamp.as_u64() {
                    tracing::debug!(rtt_ms = crate::unix_ms().saturating_sub(sent), "pong");
                }
            }
            EventMessage::Unknown(m)
                if m.get("type").and_then(Value::as_str) == Some("telemetry_end") =>
            {
                self.runner_end(&m)
            }
            EventMessage::Unknown(m) => {
                self.stats.unknown_messages.fetch_add(1, Relaxed);
                let kind = m.get("type").and_then(Value::as_str).unwrap_or("-");
                tracing::debug!(r#type = kind, "unknown events message skipped");
            }
            other => self.complete(other),
        }
    }

    /// Completes the pending request an answer names, if any.
    fn complete(&self, msg: EventMessage) {
        let Some(id) = msg.request_id().map(str::to_string) else {
            if let EventMessage::Error(e) = &msg {
                let error = Value::Object(e.extra.clone());
                let text = e
                    .extra
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if text.contains("telemetry_flow") {
                    // Scope's runner: `Unknown message type: telemetry_flow`. Stop sending it.
                    if !self.flow_refused.swap(true, Relaxed) {
                        tracing::info!("the runner does not read telemetry_flow reports (no flow control with this runner): not sending them any more");
                    }
                    return;
                }
                tracing::warn!(%error, "runner error");
            } else {
                tracing::debug!(r#type = msg.type_name(), "runner message");
            }
            return;
        };
        let waiter = self.pending.lock().remove(&id);
        match waiter {
            // The requester may have timed out meanwhile; nothing else waits for it.
            Some(tx) => {
                let _ = tx.send(msg);
            }
            None => {
                tracing::debug!(request_id = %id, r#type = msg.type_name(), "answer for no pending request")
            }
        }
    }

    /// Checks, annotates and egresses one envelope.
    fn relay(&self, bytes: Bytes) {
        self.stats.telemetry_received.fetch_add(1, Relaxed);
        match RawEnvelope::parse(bytes) {
            Ok(e) => self.relay_envelope(e),
            Err(e) => {
                self.stats.rejected_invalid.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "invalid telemetry envelope skipped");
            }
        }
    }

    /// Checks, annotates and egresses one parsed envelope.
    fn relay_envelope(&self, mut envelope: RawEnvelope) {
        if !self
            .session
            .admits(envelope.session_id(), envelope.connection_id())
        {
            self.stats.rejected_foreign.fetch_add(1, Relaxed);
            tracing::warn!(
                id = envelope.id(),
                session = envelope.session_id().unwrap_or("-"),
                connection = envelope.connection_id().unwrap_or("-"),
                "telemetry claiming another session rejected"
            );
            return;
        }
        if envelope.event_type() == Some(DROPPED_EVENT_TYPE) {
            self.stats.runner_loss_reports.fetch_add(1, Relaxed);
            let dropped = self.dropped_report(&envelope);
            tracing::warn!(dropped, "the runner reported dropped telemetry");
        }
        let received_ms = crate::unix_ms();
        if let Some(ts) = envelope.timestamp().and_then(|t| t.parse::<u64>().ok()) {
            let lag = received_ms.saturating_sub(ts).max(1);
            let _ = self.latency.lock().record(lag);
        }
        envelope.annotate_relay("trickle", received_ms);
        self.stats.relayed.fetch_add(1, Relaxed);
        match &self.egress {
            Some(egress) => egress.emit(Event::Raw(envelope)),
            None => {
                self.stats.discarded.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Creates a channel by `POST {url}` (servers that allow creation over HTTP), as a JSONL channel.
///
/// An orchestrator normally creates a job's channels; this is for servers run with autocreate.
pub async fn create_channel(url: &str) -> anyhow::Result<()> {
    create_channel_with(url, &ClientTls::default()).await
}

/// [`create_channel`], treating an `https://` server's certificate as `tls` says.
pub async fn create_channel_with(url: &str, tls: &ClientTls) -> anyhow::Result<()> {
    crate::channels::create_channel(url, "application/jsonl", tls).await
}

/// What the runner's sink writes before each envelope (its exact bytes), after the type: a
/// numbered line continues `"seq":N,"event":`, a loss report (or the seed's line) `"event":`.
const TELEMETRY_PREFIX: &[u8] = br#"{"type":"telemetry","#;

/// The `seq` (if numbered) and envelope bytes of a line in the runner's exact `telemetry` form,
/// sliced without copying. The caller still parses the envelope: a line with more members after
/// `event` is not cut right here, and fails that parse (trailing characters), so it takes the
/// general path.
fn canonical_telemetry(line: &Bytes) -> Option<(Option<u64>, Bytes)> {
    let rest = line.strip_prefix(TELEMETRY_PREFIX)?;
    let (seq, rest) = match rest.strip_prefix(br#""seq":"#) {
        Some(after) => {
            let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
            // At most 19 digits: always a u64. A leading zero is not canonical JSON.
            if digits == 0 || digits > 19 || (digits > 1 && after[0] == b'0') {
                return None;
            }
            let seq = std::str::from_utf8(&after[..digits]).ok()?.parse().ok()?;
            (Some(seq), after[digits..].strip_prefix(b",")?)
        }
        None => (None, rest),
    };
    let body = rest.strip_prefix(br#""event":"#)?;
    if body.len() < 2 || !body.ends_with(b"}") {
        return None;
    }
    let start = line.len() - body.len();
    Some((seq, line.slice(start..line.len() - 1)))
}

/// The event type a sink emits to report what it dropped.
pub const DROPPED_EVENT_TYPE: &str = "telemetry_dropped";

/// The event type the client emits downstream for lines lost between the runner and itself.
pub const LOST_IN_TRANSIT_EVENT_TYPE: &str = "telemetry_lost_in_transit";

impl Shared {
    /// A numbered event line arrived: follow the numbering, report a gap, wake the flow reporter.
    fn numbered(&self, seq: u64) {
        let (gap, lost_total) = {
            let mut t = self.transit.lock();
            let gap = t.line(seq);
            (gap, t.lost)
        };
        self.read_seq.store(seq, Relaxed);
        if let Some(gap) = gap {
            self.report_gap(gap, lost_total);
        }
        self.flow_wake.notify_one();
    }

    /// `telemetry_end`: the runner's last `seq` and totals; a lost tail is reported.
    fn runner_end(&self, m: &Map<String, Value>) {
        let num = |k: &str| m.get(k).and_then(Value::as_u64);
        let (gap, lost_total, read) = {
            let mut t = self.transit.lock();
            let gap = num("last_seq").and_then(|last| t.end(last));
            t.report(
                None,
                num("dropped_total").unwrap_or(0),
                num("lost_downstream_total").unwrap_or(0),
            );
            t.reports_written(num("reports").unwrap_or(0));
            (gap, t.lost, t.read_seq())
        };
        tracing::info!(
            last_seq = num("last_seq").unwrap_or(0),
            "the runner announced the end of its telemetry"
        );
        self.read_seq.store(read, Relaxed);
        if let Some(gap) = gap {
            self.report_gap(gap, lost_total);
        }
        self.flow_wake.notify_one();
    }

    /// The drops a `telemetry_dropped` envelope reports: from its cumulative `dropped_total`
    /// (a lost report's count comes with the next), else its `dropped`.
    fn dropped_report(&self, envelope: &RawEnvelope) -> u64 {
        let v = serde_json::from_slice::<Value>(envelope.as_bytes()).unwrap_or(Value::Null);
        let num = |k: &str| v.pointer(&format!("/data/{k}")).and_then(Value::as_u64);
        match num("dropped_total") {
            Some(total) => self.transit.lock().report(
                num("report_seq"),
                total,
                num("lost_downstream_total").unwrap_or(0),
            ),
            None => {
                let dropped = num("dropped").unwrap_or(0);
                self.stats.dropped_reported.fetch_add(dropped, Relaxed);
                dropped
            }
        }
    }

    /// Emits one `telemetry_lost_in_transit` envelope downstream for `gap`.
    fn report_gap(&self, gap: Gap, lost_total: u64) {
        tracing::warn!(
            lost = gap.lost(),
            seq_from = gap.from,
            seq_to = gap.to,
            reason = gap.reason,
            lost_total,
            "telemetry lost between the runner and this client; reported downstream as telemetry_lost_in_transit"
        );
        let mut fields = Fields::new();
        if let Some(id) = &self.session.session_id {
            fields = fields.session_id(id.clone());
        }
        if let Some(id) = &self.session.connection_id {
            fields = fields.connection_id(id.clone());
        }
        let fields = fields
            .meta("lost", gap.lost())
            .meta("seq_from", gap.from)
            .meta("seq_to", gap.to)
            .meta("reason", gap.reason)
            .meta("lost_total", lost_total);
        self.lost_reports_made.fetch_add(1, Relaxed);
        match &self.egress {
            Some(egress) => egress.emit(Event::from(Envelope::new(
                LOST_IN_TRANSIT_EVENT_TYPE,
                fields,
            ))),
            None => {
                self.stats.discarded.fetch_add(1, Relaxed);
            }
        }
    }
}

/// How often, at most, the client reports its reading to the runner: the runner's credit
/// (2.5 segments, ~20,000 heartbeat lines) comes back this often, so it must be short next to the
/// time the client takes to read the credit (40 ms at 500,000 lines/s). A report is one small
/// control line: 100 a second cost nothing next to the events.
const FLOW_REPORT_EVERY: Duration = Duration::from_millis(10);

/// Reports the last `seq` read to the runner (`telemetry_flow {read_seq}`): after each numbered
/// line, at most every [`FLOW_REPORT_EVERY`], nothing while no line arrives; stops for good if
/// the runner answers it `error`.
async fn flow_loop(control: JsonlWriter, shared: Arc<Shared>) {
    let mut sent = None;
    loop {
        shared.flow_wake.notified().await;
        if shared.flow_refused.load(Relaxed) {
            return;
        }
        let read = shared.read_seq.load(Relaxed);
        if sent != Some(read) {
            let msg = serde_json::json!({"type": "telemetry_flow", "read_seq": read});
            if control.write(&msg).await.is_err() {
                return;
            }
            shared.stats.flow_reports.fetch_add(1, Relaxed);
            sent = Some(read);
        }
        tokio::time::sleep(FLOW_REPORT_EVERY).await;
    }
}

/// Reads the events channel until it ends, dispatching each message.
async fn events_loop(config: ClientConfig, shared: Arc<Shared>) {
    let subscriber = Subscriber::new(
        config.events_url.clone(),
        SubscriberOptions {
            start_seq: config.events_start_seq,
            reconnect_window: config.reconnect_window,
            tls: config.trickle_tls.clone(),
            local_address: config.local_address,
            // Telemetry: skip as little as possible (every line skipped is counted lost).
            jump_to_current: true,
            ..SubscriberOptions::default()
        },
    );
    let mut reader = JsonlReader::new(
        subscriber,
        JsonlReaderOptions {
            max_line_bytes: config.max_event_bytes,
        },
    );
    loop {
        // Raw lines (framing checked, oversize counted); `dispatch_line` validates each once.
        let next = reader.next_line().await;
        let stats = reader.stats();
        shared.bad_lines.store(stats.bad_lines(), Relaxed);
        *shared.subscriber.lock() = stats.subscriber;
        let skipped = stats.subscriber.skipped_segments;
        if shared.skipped_segments.swap(skipped, Relaxed) < skipped {
            tracing::warn!(
                skipped_segments = skipped,
                "the client fell behind the events channel's window and skipped segments: their telemetry is lost (the runner writes faster than this client reads)"
            );
        }
        match next {
            Ok(Some(line)) => {
                let forward = shared.dispatch_line(line);
                if let (Some(line), Some(tx)) = (forward, &config.messages) {
                    // A consumer that went away only stops getting messages; telemetry goes on.
                    let _ = tx.send(line).await;
                }
            }
            Ok(None) if reader.channel_missing() => {
                tracing::error!(events = %config.events_url, "events channel does not exist (HTTP 404)");
                break;
            }
            Ok(None) => {
                tracing::info!(events = %config.events_url, "events channel ended");
                break;
            }
            Err(e) => {
                tracing::error!(events = %config.events_url, error = %e, "events subscription failed");
                if matches!(e, SubscribeError::Tls { .. }) {
                    *shared.tls_refused.lock() = Some(e.to_string());
                }
                break;
            }
        }
    }
    shared
        .events_missing
        .store(reader.channel_missing(), Relaxed);
    shared.events_ended.store(true, Relaxed);
    // Wake every waiter: no answer can arrive any more.
    shared.pending.lock().clear();
}

/// Pings the runner every `interval` (the seed's keepalive).
async fn ping_loop(control: JsonlWriter, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let ping = ControlMessage::Ping(Ping {
            timestamp: crate::unix_ms().into(),
            request_id: None,
            extra: Map::new(),
        });
        if control.write(&ping).await.is_err() {
            break;
        }
    }
}
