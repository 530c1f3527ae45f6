//! The runner role: the GPU side of a session.
//!
//! It behaves as Scope's runner (`livepeer_app.py`) does, so a Scope client can drive it. For the
//! life of its control subscription the runner:
//! - installs a [`TrickleEventsSink`] as the process's telemetry sink, so every `publish_event`
//!   (its own, or a local process's through [`ingest`]) becomes a `telemetry` line on the events
//!   channel;
//! - writes the `runner_ready` control message (`runner_job_id`, and `telemetry_flow: true`, which
//!   tells our client it may report its reading), and a `runner_ready` telemetry event with
//!   metadata `{"mode": "livepeer", "startup_ms": <cold start>}`;
//! - answers **every** control message in Scope's shapes ([`control`]): `start_stream` creates the
//!   stream's `in` and `out` media channels and passes input segments through to the output
//!   ([`media`]), `stream_started` lists them in `channels`; unknown types get `error`;
//! - drives a simulated [`pipeline::Pipeline`]: `session_created` (`{"mode": "livepeer"}`) and
//!   lifecycle events at the start, `stream_heartbeat` with the seed's fields every
//!   [`RunnerConfig::heartbeat_interval`] (10 s, as the seed) while a stream runs, lifecycle
//!   events and `session_closed` at its stop, media loop failures as `error` events;
//! - forwards its own log lines in `logs` batches (at most 50 lines, every 0.5 s).
//!
//! With telemetry opted out (`SCOPE_TELEMETRY_DISABLED` / `DO_NOT_TRACK`) it says so once and
//! publishes nothing: its own events and the ingest endpoint's are discarded (the endpoint counts
//! them); control is answered as usual.
//!
//! **Every event accounted for.** The sink numbers the event lines (`seq`); our client reports the
//! last one it read (`telemetry_flow {read_seq}` on the control channel, a few times a second while
//! lines flow), and the sink holds its writes to the budget that implies
//! ([`telemetry::flow`]): overload sheds heartbeats here, counted and reported, rather than the
//! client losing segments in transit ([`RunnerConfig::flow_control`] turns that off).
//!
//! When the control channel ends (the client closed it), the client asks to end
//! (`telemetry_flow {end: true}`), or on shutdown, it stops the stream (media channels deleted),
//! drains the sink (writing a final `telemetry_dropped` if anything was dropped), announces
//! `telemetry_end {last_seq, reports, dropped_total, lost_downstream_total}`, and, while the control
//! channel is open and the client reports its reading, waits (up to [`RunnerConfig::close_wait`])
//! until the client has read the last line: deleting the channel earlier would cut a client still a
//! segment or more behind. Then it closes the events channel so the client's events loop ends too.
//!
//! A trickle server outage shorter than [`RunnerConfig::reconnect_window`] does not end the
//! session: the control subscription reconnects (and reads on from where it broke off), and the
//! events publisher keeps re-sending its open segment on the same seq until the server is back.
//! Meanwhile telemetry never blocks: the events writer's queue fills, then the sink's bounded
//! queue sheds and counts. Events the writer could not deliver (a failed segment,
//! [`trickle::jsonl::WriterStats::counted_lost`]) are moved from the sink's `delivered` to its
//! drops every 100 ms ([`fold_lost_lines`]), so the next `telemetry_dropped` reports them too.
//!
//! An idle runner costs next to nothing: its telemetry drain parks until an event arrives (polling
//! at most every [`RunnerConfig::telemetry_max_poll`] for loss reports); its other timers are
//! its heartbeat, its writers' segment rotation and the 100 ms lost-events fold. Many runners may share a process
//! ([`RunnerConfig::install_sink`] off), as `bench sessions` runs them: each publishes its own
//! events to its own sink.
//!
//! Both channels treat an `https://` server's certificate as [`RunnerConfig::trickle_tls`] says
//! (see [`trickle::client_tls`]). A refused control-channel certificate ends the runner with that
//! error (naming the URL, the reason and the flag) instead of a session that never starts.

pub mod control;
pub mod ingest;
pub mod media;
pub mod pipeline;
pub mod vram;

use crate::accounting::Accounting;
use crate::logtail::LogTail;
use crate::SessionIds;
use anyhow::Context as _;
use pipeline::{Emit, Pipeline};
use serde_json::{json, Map, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::sinks::{SessionContext, TrickleEventsConfig, TrickleEventsSink};
use telemetry::{Envelope, Event, Fields, Sink, SinkStats};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trickle::client_tls::ClientTls;
use trickle::jsonl::{
    JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions, ReaderStats, WriterStats,
};
use trickle::publisher::{Publisher, PublisherOptions, PublisherStats};
use trickle::subscriber::{SubscribeError, Subscriber, SubscriberOptions, SubscriberStats};

/// Default [`RunnerConfig::telemetry_poll_interval`]: 1 ms (the sink's own default is 5 ms) cuts
/// end-to-end latency at 10,000 events/s from a 3.6 ms median to 1.3 ms (BENCHMARKS.md), for
/// about a thousand cheap timer wake-ups a second.
pub const DEFAULT_TELEMETRY_POLL: Duration = Duration::from_millis(1);

/// Default [`RunnerConfig::telemetry_max_poll`]: an idle drain wakes once a second, instead of
/// every poll interval (a thousand times a second); events still wake it at once, and a pending
/// loss report at its due time. The poll only bounds how soon a loss counted meanwhile (events
/// the events writer lost in a failed segment, folded every 100 ms) is reported as
/// `telemetry_dropped`.
pub const DEFAULT_TELEMETRY_MAX_POLL: Duration = Duration::from_secs(1);

/// Default [`RunnerConfig::events_segment_bytes`]: 4 MiB, so a client may fall 20 MiB behind
/// (the server's 5-segment window) before it skips telemetry, four times the 1 MiB default's
/// slack, while every segment stays under the Python reader's 5 MiB cap.
pub const DEFAULT_EVENTS_SEGMENT_BYTES: usize = 4 << 20;

/// Default [`RunnerConfig::heartbeat_interval`]: every 10 s, as the seed's `FrameProcessor`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Default [`RunnerConfig::reconnect_window`]: ride out a trickle server outage of up to a minute.
pub const DEFAULT_RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// Default [`RunnerConfig::close_wait`].
pub const DEFAULT_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How often the runner folds the events writer's lost lines into the sink's drop count.
const LOST_LINES_POLL: Duration = Duration::from_millis(100);

/// How the runner is set up.
#[derive(Clone)]
pub struct RunnerConfig {
    /// Filled by [`run`] with a reader of the live counters (what `runner --metrics-listen`
    /// exports); the final [`RunnerReport`] comes from the same counters.
    pub probe: Option<RunnerProbe>,
    /// The control channel URL (the runner subscribes).
    pub control_url: String,
    /// The events channel URL (the runner publishes).
    pub events_url: String,
    /// The job id reported in `runner_ready`.
    pub runner_job_id: Option<String>,
    /// The session this runner serves; unset ids are adopted from `start_stream` params
    /// (`session_id`, `connection_id`).
    pub session: SessionIds,
    /// Capacity of the telemetry queue (the seed's is 256).
    pub queue_capacity: usize,
    /// How often the telemetry drain looks for queued events: the most a quiet event waits
    /// before it is written (the queue wakes it sooner only when half full).
    pub telemetry_poll_interval: Duration,
    /// How far an idle telemetry drain backs off its polling (after activity it polls every
    /// `telemetry_poll_interval` once more, then this); an event wakes it at once regardless.
    pub telemetry_max_poll: Duration,
    /// How long the idle drain must have been parked before an event wakes it at once
    /// (`Duration::MAX`: never woken, it only polls); see `telemetry::queue::DEFAULT_MIN_IDLE`.
    pub telemetry_min_idle: Duration,
    /// Size at which the events writer starts a new segment. The server keeps the last 5
    /// segments, so this sets how far (5 × this) a reader may fall behind before it skips; the
    /// Python reader caps a whole segment at 5 MiB, so stay below that.
    pub events_segment_bytes: usize,
    /// How often a running stream emits `stream_heartbeat` (the seed: every 10 s).
    pub heartbeat_interval: Duration,
    /// Where `start_stream` creates the media channels: the trickle server's base URL. `None`:
    /// the server and base path of the control channel.
    pub media_base_url: Option<String>,
    /// Largest media input segment the passthrough accepts.
    pub max_media_segment_bytes: usize,
    /// The simulated pipeline's id and frame rate.
    pub pipeline_id: String,
    /// Nominal frames per second of the simulated pipeline.
    pub pipeline_fps: f64,
    /// Forward this process's log lines to the client in `logs` batches.
    pub forward_logs: bool,
    /// Serve the loopback ingest endpoint here (sidecar mode).
    pub ingest: Option<SocketAddr>,
    /// When the runner process started, for `runner_ready.startup_ms`.
    pub started_at: Instant,
    /// A restarted runner sets this so its first events segment resets the channel.
    pub reset_events: bool,
    /// Also hand every event the runner emits to this sink (a record of what left, for audits).
    pub emitted_copy: Option<Arc<dyn Sink>>,
    /// How long both channels keep reconnecting through a trickle server outage before the
    /// session ends; zero: give up after the reference clients' retries (about 2.5 s).
    pub reconnect_window: Duration,
    /// Lines the events writer queues while its segment cannot be written (e.g. during an
    /// outage); beyond them the telemetry sink's own queue sheds, counting every drop.
    pub events_queue_lines: usize,
    /// How both channels treat an `https://` server's certificate (default: any is accepted).
    pub trickle_tls: ClientTls,
    /// Install the runner's sink as the process-wide sink (default), so that every
    /// `publish_event` in the process goes to this session. Off, only the runner's own events
    /// (and [`ingest`]) reach its events channel: for many runners in one process.
    pub install_sink: bool,
    /// Local address every channel of the runner connects from (`None`: the system's choice);
    /// see [`trickle::publisher::PublisherOptions::local_address`].
    pub local_address: Option<IpAddr>,
    /// Hold the telemetry drain to the budget the client's reading implies (`telemetry_flow`
    /// reports; on by default). Off: the reports are still read (for the end of the session), but
    /// the runner writes as fast as events come and a slow client may lose segments in transit.
    pub flow_control: bool,
    /// At the end, how long to wait for a client that reports its reading to read the last line
    /// before the events channel is deleted (default 10 s).
    pub close_wait: Duration,
}

impl RunnerConfig {
    /// A runner for these two channels with the defaults of the seed application.
    pub fn new(control_url: impl Into<String>, events_url: impl Into<String>) -> RunnerConfig {
        RunnerConfig {
            control_url: control_url.into(),
            events_url: events_url.into(),
            runner_job_id: None,
            session: SessionIds::default(),
            queue_capacity: 256,
            telemetry_poll_interval: DEFAULT_TELEMETRY_POLL,
            telemetry_max_poll: DEFAULT_TELEMETRY_MAX_POLL,
            telemetry_min_idle: telemetry::queue::DEFAULT_MIN_IDLE,
            events_segment_bytes: DEFAULT_EVENTS_SEGMENT_BYTES,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            media_base_url: None,
            max_media_segment_bytes: 64 << 20,
            pipeline_id: "passthrough".into(),
            pipeline_fps: 30.0,
            forward_logs: true,
            ingest: None,
            started_at: Instant::now(),
            reset_events: false,
            emitted_copy: None,
            reconnect_window: DEFAULT_RECONNECT_WINDOW,
            events_queue_lines: JsonlWriterOptions::default().queue_capacity,
            trickle_tls: ClientTls::default(),
            install_sink: true,
            local_address: None,
            flow_control: true,
            close_wait: DEFAULT_CLOSE_WAIT,
            probe: None,
        }
    }
}

/// Where [`run`] puts a reader of its live counters: the sink's, the events writer's and
/// publisher's, the control subscription's (the rest of [`RunnerReport`] stays zero until the end).
pub type RunnerProbe = Arc<std::sync::OnceLock<Box<dyn Fn() -> RunnerReport + Send + Sync>>>;

/// What a runner did, returned when it ends.
#[derive(Debug, Clone, Default)]
pub struct RunnerReport {
    /// Control messages handled (bad lines excluded).
    pub control_messages: u64,
    /// Control lines that were not valid messages, counted and skipped.
    pub bad_control_lines: u64,
    /// The telemetry sink's counters: emitted, delivered, dropped.
    pub sink: SinkStats,
    /// Log lines forwarded to the client.
    pub log_lines: u64,
    /// The events writer's counters (`lines_lost`: lines in segments that failed).
    pub events: WriterStats,
    /// The events publisher's counters (`reconnects`: outages ridden out).
    pub events_publisher: PublisherStats,
    /// The control subscription's counters (`reconnects`, `resumed_segments`...).
    pub control: SubscriberStats,
    /// The control channel was never there (404 before the server ever showed it): the runner
    /// had nothing to answer. Not an ordinary end; the command exits non-zero naming the fix.
    pub control_missing: bool,
    /// The media passthrough's counters, over every stream.
    pub media: media::MediaStats,
    /// What the sink wrote: the last event `seq`, reports, drops (as `telemetry_end` announced).
    pub transit: telemetry::sinks::TransitTotals,
    /// The last `seq` the client reported having read (`None`: it never reported).
    pub client_read_seq: Option<u64>,
}

/// Why the runner's main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Shutdown was asked for (the control channel may still be open).
    Shutdown,
    /// The control channel ended: nothing more can come from the client.
    ControlClosed,
    /// The client asked to end (`telemetry_flow {end: true}`); its control channel is open.
    ClientAsked,
}

impl RunnerReport {
    /// What became of the telemetry the runner emitted: delivered means acknowledged by the
    /// trickle server; the events lost in failed segments are in `dropped`, never in `delivered`.
    pub fn telemetry(&self) -> Accounting {
        Accounting::of_sink(&self.sink)
    }

    /// Of the telemetry events handed to the events writer, those lost in segments that failed
    /// (counted in [`RunnerReport::telemetry`]'s `dropped`).
    pub fn lost_in_failed_segments(&self) -> u64 {
        self.events.counted_lost
    }
}

/// Runs the runner until its control channel ends or `shutdown` fires.
pub async fn run(
    config: RunnerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunnerReport> {
    let publisher = Publisher::new(
        config.events_url.clone(),
        PublisherOptions {
            reset: config.reset_events,
            content_type: "application/jsonl".into(),
            reconnect_window: config.reconnect_window,
            tls: config.trickle_tls.clone(),
            local_address: config.local_address,
            ..PublisherOptions::default()
        },
    );
    let publisher_stats = Arc::new(publisher.stats_handle());
    let events = JsonlWriter::new(
        publisher,
        JsonlWriterOptions {
            max_segment_bytes: config.events_segment_bytes,
            queue_capacity: config.events_queue_lines.max(1),
            ..JsonlWriterOptions::default()
        },
    );
    let session = config.session.clone();
    let sink = TrickleEventsSink::spawn_on(
        &tokio::runtime::Handle::current(),
        events.clone(),
        SessionContext {
            session_id: session.session_id.clone(),
            connection_id: session.connection_id.clone(),
        },
        TrickleEventsConfig {
            capacity: config.queue_capacity,
            poll_interval: config.telemetry_poll_interval,
            max_poll_interval: Some(config.telemetry_max_poll),
            min_idle: config.telemetry_min_idle,
            flow_segment_bytes: config.flow_control.then_some(config.events_segment_bytes),
            flow_close_wait: config.close_wait,
            ..TrickleEventsConfig::default()
        },
    );
    let installed: Arc<dyn Sink> = match &config.emitted_copy {
        Some(copy) => Arc::new(Tee {
            primary: sink.clone(),
            copy: copy.clone(),
        }),
        None => sink.clone(),
    };
    let guard = config
        .install_sink
        .then(|| telemetry::install_sink(installed.clone()));
    let folded = Arc::new(AtomicU64::new(0));
    let lost_lines = tokio::spawn(fold_lost_lines(
        events.clone(),
        sink.clone(),
        folded.clone(),
    ));

    if let Some(by) = telemetry::egress::opted_out_by(|k| std::env::var(k).ok()) {
        telemetry::set_telemetry_enabled(false);
        tracing::warn!("telemetry disabled by {by}: this runner publishes no telemetry (its own events and the ingest endpoint's are discarded); control is answered as usual");
    }
    let startup_ms = config.started_at.elapsed().as_millis() as u64;
    // Scope's runner sends only the job id here; the cold start is in the telemetry event.
    // `telemetry_flow` (ours; Scope's client ignores it): this runner reads the client's reports.
    events
        .write(&json!({
            "type": "runner_ready",
            "runner_job_id": config.runner_job_id,
            "telemetry_flow": true,
        }))
        .await
        .with_context(|| format!("cannot write to the events channel {}", config.events_url))?;
    publish(
        &installed,
        &session,
        None,
        Emit::new("runner_ready")
            .with("mode", json!("livepeer"))
            .with("startup_ms", json!(startup_ms)),
    );
    tracing::info!(startup_ms, events = %config.events_url, "runner ready");

    let ingest = match config.ingest {
        Some(addr) => Some(ingest::serve(addr, events.clone(), shutdown.child_token()).await?),
        None => None,
    };
    let logs = config.forward_logs.then(|| {
        tokio::spawn(forward_logs(
            LogTail::global().clone(),
            events.clone(),
            shutdown.child_token(),
        ))
    });

    let (control_tx, mut control_rx) = mpsc::channel(64);
    // The reader runs in its own task so no select! ever cancels it mid-line.
    let control_stats = Arc::new(parking_lot::Mutex::new(ReaderStats::default()));
    let reader_task = tokio::spawn(read_control(
        config.control_url.clone(),
        SubscriberOptions {
            reconnect_window: config.reconnect_window,
            tls: config.trickle_tls.clone(),
            local_address: config.local_address,
            ..SubscriberOptions::default()
        },
        control_tx,
        control_stats.clone(),
    ));
    if let Some(probe) = &config.probe {
        let (sink, events) = (sink.clone(), events.clone());
        let (control, publisher) = (control_stats.clone(), publisher_stats.clone());
        let _ = probe.set(Box::new(move || {
            let control = *control.lock();
            RunnerReport {
                bad_control_lines: control.bad_lines(),
                sink: sink.stats(),
                events: events.stats(),
                events_publisher: publisher(),
                control: control.subscriber,
                ..RunnerReport::default()
            }
        }));
    }
    let vram = vram::Vram::probe();
    if let Some(name) = vram.as_ref().and_then(vram::Vram::device_name) {
        tracing::info!(gpu = %name, "reading VRAM through NVML");
    }
    let mut state = control::StreamState {
        session: session.clone(),
        pipeline: Pipeline::new(config.pipeline_id.clone(), config.pipeline_fps),
        vram,
        media_options: media::MediaOptions {
            base_url: config
                .media_base_url
                .clone()
                .unwrap_or_else(|| crate::channels::sibling_url(&config.control_url, "")),
            reconnect_window: config.reconnect_window,
            max_segment_bytes: config.max_media_segment_bytes,
            tls: config.trickle_tls.clone(),
            local_address: config.local_address,
        },
        media: None,
        media_done: media::MediaStats::default(),
        sink: installed.clone(),
    };
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = RunnerReport::default();

    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ended::Shutdown,
            msg = control_rx.recv() => match msg {
                Some(msg) => {
                    report.control_messages += 1;
                    if let Some(flow) = control::flow_report(&msg) {
                        if flow_reported(&flow, &sink, &events).await {
                            break Ended::ClientAsked;
                        }
                        continue;
                    }
                    let was_streaming = state.is_streaming();
                    let answer = control::answer(msg, &mut state).await;
                    if let Err(e) = events.write(&answer).await {
                        tracing::warn!(error = %e, "cannot answer on the events channel");
                    }
                    if !was_streaming && state.is_streaming() {
                        // The first heartbeat comes one interval after the start, as the seed's.
                        heartbeat.reset();
                    }
                }
                None => break Ended::ControlClosed,
            },
            _ = heartbeat.tick(), if state.is_streaming() => state.heartbeat(),
        }
    };

    state.stop_stream().await;
    report.media = state.media_stats();
    drop(guard);
    lost_lines.abort();
    let _ = lost_lines.await;
    // Lines lost so far go into the sink's final report.
    fold_lost_lines_once(&events, &sink, &folded);
    report.sink = drain_sink(
        &sink,
        ended,
        config.flow_control,
        &mut control_rx,
        &events,
        &mut state,
    )
    .await;
    report.transit = sink.transit();
    announce_end(&events, &report.transit).await;
    if ended != Ended::ControlClosed {
        let waited = Instant::now();
        let read = wait_for_client(
            &sink,
            &mut control_rx,
            &events,
            &mut state,
            config.close_wait,
        )
        .await;
        match read {
            Some(read) if read >= report.transit.last_seq => {
                tracing::debug!(last_seq = read, waited_ms = waited.elapsed().as_millis() as u64, "the client read every event line");
            }
            Some(read) => tracing::warn!(
                read_seq = read,
                last_seq = report.transit.last_seq,
                "the client had not read every event line when the wait ended; closing the events channel anyway (it counts the rest as lost in transit if it reads on)"
            ),
            None => {}
        }
    }
    report.client_read_seq = sink.client_read_seq();
    reader_task.abort();
    // Aborted (it was still reading): neither missing nor refused.
    let control_end = reader_task.await.unwrap_or(ControlEnd::Ended);
    report.control_missing = matches!(control_end, ControlEnd::Missing);
    let control = *control_stats.lock();
    report.bad_control_lines = control.bad_lines();
    report.control = control.subscriber;
    if let Some(task) = logs {
        // Give the forwarder its last tick, then stop it.
        tokio::time::sleep(Duration::from_millis(10)).await;
        task.abort();
        if let Ok(n) = task.await {
            report.log_lines = n;
        }
    }
    if let Some(ingest) = ingest {
        ingest.abort();
    }
    if let Err(e) = events.close().await {
        tracing::warn!(error = %e, "closing the events channel failed");
    }
    // Every event line is now acknowledged or lost. Those lost in the last segments can no longer
    // be reported downstream (the channel is closed), but they count here: dropped, not delivered.
    fold_lost_lines_once(&events, &sink, &folded);
    report.sink = sink.stats();
    report.transit = sink.transit();
    report.events = events.stats();
    report.events_publisher = publisher_stats();
    tracing::info!(
        emitted = report.sink.emitted,
        dropped = report.sink.dropped(),
        "runner stopped"
    );
    if let ControlEnd::Refused(refused) = control_end {
        anyhow::bail!("the control channel cannot be read: {refused}");
    }
    Ok(report)
}

/// How the control channel's reading ended.
enum ControlEnd {
    /// It ended (or the runner stopped reading).
    Ended,
    /// It was never there: a 404 before the server ever showed it, a setup error.
    Missing,
    /// A refused TLS certificate ended it; the error names the URL, the reason and the flag.
    Refused(String),
}

/// Acts on one `telemetry_flow` report: records the client's reading (and answers it when it
/// carries a `request_id`). Returns whether the client asks to end the session.
async fn flow_reported(
    flow: &control::FlowReport,
    sink: &TrickleEventsSink,
    events: &JsonlWriter,
) -> bool {
    if let Some(read) = flow.read_seq {
        sink.client_read(read);
    }
    if let Some(id) = &flow.request_id {
        let answer = json!({"type": "telemetry_flow", "request_id": id, "last_seq": sink.transit().last_seq});
        if let Err(e) = events.write(&answer).await {
            tracing::warn!(error = %e, "cannot answer on the events channel");
        }
    }
    flow.end
}

/// Shuts the sink down: what is queued goes out as the client reads it (flow control holds while
/// closing, up to [`RunnerConfig::close_wait`]), so the client's reports and the control messages
/// that arrive meanwhile are handled here. With the control channel ended nobody reports any more:
/// the rest goes out at once.
async fn drain_sink(
    sink: &TrickleEventsSink,
    ended: Ended,
    flow_control: bool,
    control_rx: &mut mpsc::Receiver<Map<String, Value>>,
    events: &JsonlWriter,
    state: &mut control::StreamState,
) -> SinkStats {
    if ended == Ended::ControlClosed {
        sink.release_flow();
    } else if flow_control && sink.client_read_seq().is_some() && sink.stats().queued > 0 {
        tracing::info!(
            queued = sink.stats().queued,
            lag_bytes = sink.client_lag_bytes(),
            "stopping: the queued telemetry goes out as the client reads it (flow control)"
        );
    }
    let shutdown = sink.shutdown();
    tokio::pin!(shutdown);
    let mut control_open = ended != Ended::ControlClosed;
    loop {
        tokio::select! {
            stats = &mut shutdown => return stats,
            msg = control_rx.recv(), if control_open => match msg {
                Some(msg) => closing_message(msg, sink, events, state).await,
                None => {
                    control_open = false;
                    sink.release_flow();
                }
            },
        }
    }
}

/// Writes `telemetry_end`: the last event `seq` and the sink's totals, after its final report.
async fn announce_end(events: &JsonlWriter, t: &telemetry::sinks::TransitTotals) {
    let end = json!({
        "type": "telemetry_end",
        "last_seq": t.last_seq,
        "reports": t.reports,
        "dropped_total": t.dropped_total,
        "lost_downstream_total": t.lost_downstream,
    });
    if let Err(e) = events.write(&end).await {
        tracing::warn!(error = %e, "cannot write telemetry_end on the events channel");
    }
}

/// Waits, up to `wait`, until a client that reports its reading has read the last event line,
/// answering the control messages that arrive meanwhile. Returns the client's last report (`None`:
/// it never reported, so there is nothing to wait for).
async fn wait_for_client(
    sink: &TrickleEventsSink,
    control_rx: &mut mpsc::Receiver<Map<String, Value>>,
    events: &JsonlWriter,
    state: &mut control::StreamState,
    wait: Duration,
) -> Option<u64> {
    let last = sink.transit().last_seq;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let read = sink.client_read_seq()?;
        if read >= last {
            return Some(read);
        }
        let msg = tokio::select! {
            msg = control_rx.recv() => msg,
            _ = tokio::time::sleep_until(deadline) => return Some(read),
        };
        let Some(msg) = msg else {
            return sink.client_read_seq();
        };
        closing_message(msg, sink, events, state).await;
    }
}

/// A control message while the runner closes: a `telemetry_flow` report is recorded, anything
/// else answered.
async fn closing_message(
    msg: Map<String, Value>,
    sink: &TrickleEventsSink,
    events: &JsonlWriter,
    state: &mut control::StreamState,
) {
    if let Some(flow) = control::flow_report(&msg) {
        flow_reported(&flow, sink, events).await;
    } else {
        let answer = control::answer(msg, state).await;
        if let Err(e) = events.write(&answer).await {
            tracing::warn!(error = %e, "cannot answer on the events channel");
        }
    }
}

/// Reads the control channel into `tx`, keeping `stats` current, until it ends; says how.
async fn read_control(
    url: String,
    options: SubscriberOptions,
    tx: mpsc::Sender<Map<String, Value>>,
    stats: Arc<parking_lot::Mutex<ReaderStats>>,
) -> ControlEnd {
    let subscriber = Subscriber::new(url.clone(), options);
    let mut reader = JsonlReader::new(subscriber, JsonlReaderOptions::default());
    loop {
        // Raw objects: a message of a known type with a wrong shape is still answered (`error`).
        let next = reader.next::<Map<String, Value>>().await;
        *stats.lock() = reader.stats();
        match next {
            Ok(Some(msg)) => {
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            Ok(None) if reader.channel_missing() => {
                tracing::error!(control = %url, "control channel does not exist (HTTP 404); nothing to answer");
                return ControlEnd::Missing;
            }
            Ok(None) => {
                tracing::info!(control = %url, "control channel ended");
                break;
            }
            Err(e) => {
                tracing::error!(control = %url, error = %e, "control subscription failed");
                if matches!(e, SubscribeError::Tls { .. }) {
                    return ControlEnd::Refused(e.to_string());
                }
                return if reader.channel_missing() {
                    ControlEnd::Missing
                } else {
                    ControlEnd::Ended
                };
            }
        }
    }
    ControlEnd::Ended
}

/// Adds the events writer's newly lost lines to the sink's drops, every 100 ms,
/// until aborted (also run by the Python package's `TrickleEventsSink`).
pub async fn fold_lost_lines(
    events: JsonlWriter,
    sink: Arc<TrickleEventsSink>,
    folded: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(LOST_LINES_POLL);
    loop {
        tick.tick().await;
        fold_lost_lines_once(&events, &sink, &folded);
    }
}

/// One step of [`fold_lost_lines`]: `folded` is the writer's lost count already added.
pub fn fold_lost_lines_once(events: &JsonlWriter, sink: &TrickleEventsSink, folded: &AtomicU64) {
    // Only the sink's events: lost answers, log batches and loss reports are no telemetry.
    let lost = events.stats().counted_lost;
    let before = folded.swap(lost, Ordering::Relaxed);
    if lost > before {
        sink.count_lost_downstream(lost - before);
        tracing::warn!(
            events = lost - before,
            "telemetry events lost in failed events segments; counted as dropped"
        );
    }
}

/// Builds the envelope for `emit` and hands it to the runner's sink (not the process-wide one,
/// which another runner in the same process may hold). A no-op when telemetry is opted out.
pub(crate) fn publish(
    sink: &Arc<dyn Sink>,
    session: &SessionIds,
    pipeline_id: Option<&str>,
    emit: Emit,
) {
    if !telemetry::telemetry_enabled() {
        return;
    }
    let mut fields = Fields::new();
    if let Some(id) = &session.session_id {
        fields = fields.session_id(id.clone());
    }
    if let Some(id) = &session.connection_id {
        fields = fields.connection_id(id.clone());
    }
    if let Some(id) = pipeline_id {
        fields = fields.pipeline_ids([id.to_string()]);
    }
    if let Some(error) = emit.error {
        fields = fields.error(error);
    }
    for (key, value) in emit.metadata {
        fields = fields.meta(key, value);
    }
    sink.emit(Event::Built(Box::new(Envelope::new(
        emit.event_type,
        fields,
    ))));
}

/// Forwards this process's log lines in batches of at most 50, every 0.5 s; returns lines sent.
async fn forward_logs(tail: LogTail, events: JsonlWriter, stop: CancellationToken) -> u64 {
    const BATCH: usize = 50;
    let mut follow = tail.follow();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut batch: Vec<String> = Vec::with_capacity(BATCH);
    let mut sent = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            line = follow.recv() => match line {
                Ok(line) => {
                    batch.push(line);
                    if batch.len() < BATCH {
                        continue;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(lost = n, "log forwarder lagged");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {}
        }
        if batch.is_empty() {
            continue;
        }
        let lines = std::mem::take(&mut batch);
        sent += lines.len() as u64;
        if events
            .write(&json!({"type": "logs", "lines": lines}))
            .await
            .is_err()
        {
            break;
        }
    }
    sent
}

/// Hands each event to the events sink and to a copy (`RunnerConfig::emitted_copy`).
struct Tee {
    primary: Arc<TrickleEventsSink>,
    copy: Arc<dyn Sink>,
}

impl Sink for Tee {
    fn emit(&self, event: Event) {
        self.copy.emit(event.clone());
        self.primary.emit(event);
    }

    fn stats(&self) -> SinkStats {
        self.primary.stats()
    }

    fn name(&self) -> &'static str {
        "tee"
    }

    fn flush(&self) {
        self.primary.flush();
        self.copy.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::output::LineCollector;
    use telemetry::sinks::SessionContext;

    #[tokio::test]
    async fn events_the_events_writer_lost_move_from_delivered_to_dropped_and_are_reported_once() {
        // A port nobody listens on: every segment fails, and its lines are counted lost.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let events = JsonlWriter::new(
            Publisher::new(
                format!("http://127.0.0.1:{port}/events"),
                PublisherOptions {
                    retry_delay: Duration::from_millis(10),
                    ..PublisherOptions::default()
                },
            ),
            JsonlWriterOptions::default(),
        );
        // Five events (counted) and a loss report after them, then an answer (not counted).
        let chunk: String = (0..6).map(|i| format!("{{\"i\":{i}}}\n")).collect();
        events
            .write_chunk_counted(bytes::Bytes::from(chunk), 5)
            .await
            .unwrap();
        events.write(&json!({"type": "pong"})).await.unwrap();
        // Closing settles the segment: its POST failed, so all 7 lines are lost, 5 of them events.
        assert!(events.close().await.is_err());
        let w = events.stats();
        assert_eq!((w.lines_lost, w.counted_lost), (7, 5), "{w:?}");
        assert_eq!((w.counted_accepted, w.counted_acked), (5, 0), "{w:?}");

        // A sink that handed those five events on (delivered), then learns they were lost.
        let out = LineCollector::new();
        let sink = TrickleEventsSink::spawn_on(
            &tokio::runtime::Handle::current(),
            out.clone(),
            SessionContext::default(),
            TrickleEventsConfig::default(),
        );
        for _ in 0..5 {
            sink.emit(Event::from(telemetry::Envelope::new(
                "stream_heartbeat",
                Fields::new(),
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.stats().delivered < 5 {
            assert!(Instant::now() < deadline, "{:?}", sink.stats());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let folded = AtomicU64::new(0);
        fold_lost_lines_once(&events, &sink, &folded);
        fold_lost_lines_once(&events, &sink, &folded);
        let stats = sink.shutdown().await;
        let t = Accounting::of_sink(&stats);
        assert_eq!(
            (t.emitted, t.delivered, t.dropped, t.queued),
            (5, 0, 5, 0),
            "moved once, never both delivered and lost: {stats:?}"
        );
        let reports: Vec<Value> = out
            .lines()
            .iter()
            .map(|l| serde_json::from_slice::<Value>(l).unwrap())
            .filter(|l| l["event"]["data"]["type"] == "telemetry_dropped")
            .collect();
        let reported: u64 = reports
            .iter()
            .map(|r| r["event"]["data"]["dropped"].as_u64().unwrap())
            .sum();
        assert_eq!(reported, 5, "{reports:?}");
    }
}
