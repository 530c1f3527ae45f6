//! `GET /metrics` for every long-running process, in the Prometheus text format (0.0.4).
//!
//! Every number a process exports already exists inside it as the counters its summaries, its
//! `--report` file and its JSON endpoints read: the trickle server's [`ServerStats`], the
//! runner's [`RunnerReport`], the client's [`ClientReport`] and egress [`SinkStats`], the
//! collector's [`CollectorStats`]. Nothing here counts twice: each process registers one
//! *probe*, a closure that reads those counters when Prometheus scrapes and writes them through
//! [`prometheus_client`]'s encoder (no hand-written formatting). The hot paths pay nothing
//! beyond the relaxed atomic adds they already made.
//!
//! ```no_run
//! # async fn f(channels: trickle::server::Channels) -> anyhow::Result<()> {
//! let metrics = metrics::Metrics::new().with(metrics::server(channels));
//! let stop = tokio_util::sync::CancellationToken::new();
//! let addr = metrics::serve("127.0.0.1:0".parse()?, metrics, stop).await?;
//! println!("scrape http://{addr}/metrics");
//! # Ok(()) }
//! ```
//!
//! Names follow Prometheus's conventions: the `trickle_relay_` prefix, then the process
//! (`server_`, `runner_`, `client_`, `collector_`), `_total` on counters, base units (`_bytes`,
//! `_seconds`). Labels have a small fixed set of values (a route, a status class, a priority, a
//! sink's name), never a session id or a channel name. `docs/metrics.md` lists every metric.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use collector::CollectorStats;
pub use relay::client::ClientReport;
pub use relay::runner::RunnerReport;
pub use telemetry::SinkStats;
pub use trickle::server::ServerStats;

/// Every metric's name starts with this (and `_`).
pub const PREFIX: &str = "trickle_relay";

/// The `Content-Type` of an exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Writes metric families: a probe's view of the encoder.
pub struct Out<'a> {
    enc: DescriptorEncoder<'a>,
}

impl Out<'_> {
    /// A counter without labels (`_total` is appended to `name`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let m = ConstCounter::new(value);
        m.encode(
            self.enc
                .encode_descriptor(name, help, None, m.metric_type())?,
        )
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let m = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        m.encode(
            self.enc
                .encode_descriptor(name, help, None, m.metric_type())?,
        )
    }

    /// A counter with one label `key`, one sample per `(label value, count)`.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        key: &str,
        values: &[(&str, u64)],
    ) -> fmt::Result {
        let mut family = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for &(label, value) in values {
            let labels = [(key, label)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter with several labels, one sample per `(label values, count)`.
    pub fn counters_by<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        keys: [&str; N],
        values: &[([&str; N], u64)],
    ) -> fmt::Result {
        let mut family = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in values {
            let pairs: Vec<(&str, &str)> =
                keys.iter().copied().zip(labels.iter().copied()).collect();
            ConstCounter::new(*value).encode(family.encode_family(&pairs)?)?;
        }
        Ok(())
    }

    /// A gauge with one label `key`, one sample per `(label value, value)`.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        key: &str,
        values: &[(&str, u64)],
    ) -> fmt::Result {
        let mut family = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for &(label, value) in values {
            let labels = [(key, label)];
            let m = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            m.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A histogram: `counts[i]` values at most `bounds[i]` (and above the bound before), a last
    /// count for the rest (`+Inf`); `sum` of every value.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) -> fmt::Result {
        let mut buckets: Vec<(f64, u64)> =
            bounds.iter().copied().zip(counts.iter().copied()).collect();
        buckets.push((f64::MAX, counts.get(bounds.len()).copied().unwrap_or(0)));
        let count = counts.iter().sum();
        let mut family = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        family
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

type ProbeFn = dyn Fn(&mut Out<'_>) -> fmt::Result + Send + Sync;

/// A closure that reads counters at scrape time and writes them (one process's families).
pub struct Probe(Box<ProbeFn>);

impl Probe {
    /// A probe from a closure.
    pub fn new(f: impl Fn(&mut Out<'_>) -> fmt::Result + Send + Sync + 'static) -> Probe {
        Probe(Box::new(f))
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Probe")
    }
}

impl Collector for Probe {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut Out { enc })
    }
}

/// What one process exports: its probes, under [`PREFIX`].
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// No probes yet.
    pub fn new() -> Metrics {
        Metrics {
            registry: Registry::with_prefix(PREFIX),
        }
    }

    /// Adds a probe.
    pub fn with(mut self, probe: Probe) -> Metrics {
        self.registry.register_collector(Box::new(probe));
        self
    }

    /// The exposition now, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String fails only if a probe's closure does.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        text
    }

    /// `GET /metrics`, to merge into a process's own HTTP router.
    pub fn router(self) -> axum::Router {
        let metrics = Arc::new(self);
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = metrics.render();
                std::future::ready(([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text))
            }),
        )
    }
}

/// Serves `GET /metrics` on `addr` until `stop` (the `--metrics-listen` of `serve` and
/// `runner`); returns the address bound (a port 0 becomes the real one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics-listen"))?;
    let bound = listener.local_addr()?;
    let app = metrics.router();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// The trickle server's families, read from [`trickle::server::Channels::stats`].
pub fn server(channels: trickle::server::Channels) -> Probe {
    Probe::new(move |out| {
        let s = channels.stats();
        out.gauge("server_channels", "Channels that exist now.", s.channels)?;
        out.gauge(
            "server_connections",
            "Connections open now (at most --max-connections).",
            s.connections_open,
        )?;
        out.counter(
            "server_connections_accepted",
            "Connections accepted within the connection limit.",
            s.connections_total,
        )?;
        out.gauge(
            "server_subscribers",
            "GETs streaming a segment or waiting for its data now.",
            s.subscribers,
        )?;
        out.gauge(
            "server_publishers",
            "POSTs writing a segment or preconnected to one now.",
            s.publishers,
        )?;
        out.counter(
            "server_segments",
            "Segments that received data.",
            s.segments,
        )?;
        out.counter(
            "server_received_bytes",
            "Segment body bytes received.",
            s.bytes_in,
        )?;
        out.counter(
            "server_sent_bytes",
            "Segment body bytes sent to readers.",
            s.bytes_out,
        )?;
        let requests: Vec<([&str; 2], u64)> = s
            .requests
            .iter()
            .map(|r| ([r.route, r.class], r.count))
            .collect();
        out.counters_by(
            "server_requests",
            "Requests by route and status class (none: the connection broke before an answer).",
            ["route", "class"],
            &requests,
        )?;
        let r = s.refused;
        out.counters(
            "server_refusals",
            "Requests and connections refused by the limit that caused them.",
            "limit",
            &[
                ("max_connections", r.connections),
                ("max_channels", r.channels),
                ("max_segment_bytes", r.segment_bytes),
                ("request_head", r.request_head),
            ],
        )
    })
}

/// The runner's families, read through [`relay::runner::RunnerConfig::probe`] (zeros until the
/// runner has started).
pub fn runner(probe: relay::runner::RunnerProbe) -> Probe {
    Probe::new(move |out| {
        let r = probe.get().map(|f| f()).unwrap_or_default();
        runner_families(out, &r)
    })
}

fn runner_families(out: &mut Out<'_>, r: &RunnerReport) -> fmt::Result {
    let s = r.sink;
    out.counter(
        "runner_events_emitted",
        "Telemetry events handed to the runner's sink.",
        s.emitted,
    )?;
    out.counter(
        "runner_events_delivered",
        "Telemetry events written to the events channel.",
        s.delivered,
    )?;
    out.counters(
        "runner_events_dropped",
        "Telemetry events dropped, by priority class (queue eviction, failed write, lost in a failed segment).",
        "priority",
        &[("high", s.dropped_high), ("low", s.dropped_low)],
    )?;
    out.gauge(
        "runner_queue_depth",
        "Telemetry events accepted and not yet delivered or dropped.",
        s.queued,
    )?;
    out.counter(
        "runner_loss_reports",
        "telemetry_dropped reports the runner sent.",
        s.reports,
    )?;
    out.counter(
        "runner_sink_write_errors",
        "Failed writes of the telemetry sink to the events channel.",
        s.write_errors,
    )?;
    let w = r.events;
    out.counter(
        "runner_events_lines_accepted",
        "Lines the events writer accepted.",
        w.lines_accepted,
    )?;
    out.counter(
        "runner_events_lines_acked",
        "Lines in events segments the server acknowledged.",
        w.lines_acked,
    )?;
    out.counter(
        "runner_events_lines_lost",
        "Lines in events segments that failed (counted as dropped telemetry).",
        w.lines_lost,
    )?;
    out.gauge(
        "runner_events_lines_held",
        "Lines the events writer holds now: accepted, not yet acknowledged or lost.",
        w.lines_accepted
            .saturating_sub(w.lines_acked + w.lines_lost),
    )?;
    out.gauge(
        "runner_events_writer_lag_lines",
        "Lines the events writer accepted and has not yet written into a segment.",
        w.lines_accepted
            .saturating_sub(w.lines_written.max(w.lines_acked + w.lines_lost)),
    )?;
    out.counter(
        "runner_events_segments_failed",
        "Events segments that failed.",
        w.segments_failed,
    )?;
    out.counters(
        "runner_reconnects",
        "Trickle server outages ridden out by reconnecting, by channel.",
        "channel",
        &[
            ("events", r.events_publisher.reconnects),
            ("control", r.control.reconnects),
        ],
    )?;
    out.counter(
        "runner_control_bad_lines",
        "Control lines that were not valid messages, skipped.",
        r.bad_control_lines,
    )
}

/// Upper bounds of the client's latency histogram, in ms.
const LATENCY_BOUNDS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 60_000,
];

/// The client's families: its counters ([`relay::client::Client::reporter`]), its latency
/// histogram, and its egress sink's (and HTTP reporter's) counters.
pub fn client(client: &relay::client::Client, egress: relay::client::egress::EgressSinks) -> Probe {
    let report = client.reporter();
    let latency = client.latency_probe();
    Probe::new(move |out| {
        let r = report();
        out.counter(
            "client_telemetry_received",
            "telemetry messages received on the events channel.",
            r.telemetry_received,
        )?;
        out.counter(
            "client_events_relayed",
            "Envelopes accepted and handed to the egress sink (or discarded when there is none).",
            r.relayed,
        )?;
        out.counter(
            "client_events_discarded",
            "Envelopes accepted but discarded: no egress sink, or telemetry opted out.",
            r.discarded,
        )?;
        out.counters(
            "client_events_rejected",
            "Envelopes rejected, by reason (foreign: another session or connection).",
            "reason",
            &[
                ("foreign", r.rejected_foreign),
                ("invalid", r.rejected_invalid),
            ],
        )?;
        out.counter(
            "client_bad_lines",
            "Bad lines on the events channel (not JSON, not a message, oversized), skipped.",
            r.bad_lines,
        )?;
        out.counter(
            "client_runner_dropped_events",
            "Drops the runner reported through telemetry_dropped.",
            r.dropped_reported,
        )?;
        out.counter(
            "client_runner_loss_reports",
            "telemetry_dropped envelopes received from the runner.",
            r.runner_loss_reports,
        )?;
        out.counter(
            "client_events_lost_in_transit",
            "Event lines our runner numbered and wrote that never arrived (gaps in its seq), each gap reported downstream as telemetry_lost_in_transit.",
            r.lost_in_transit,
        )?;
        out.counter(
            "client_transit_gaps",
            "Gaps in the runner's line numbers (one telemetry_lost_in_transit each).",
            r.transit_gaps,
        )?;
        out.counter(
            "client_runner_restarts",
            "New runners seen after the first (their numbering restarted: no gap).",
            r.runner_restarts,
        )?;
        out.counter(
            "client_flow_reports",
            "telemetry_flow reports written to the runner (flow control).",
            r.flow_reports,
        )?;
        out.counter(
            "client_unknown_messages",
            "Messages of an unknown type, skipped.",
            r.unknown_messages,
        )?;
        out.counters(
            "client_events_segments",
            "Events-channel segments that went wrong, by outcome (skipped: fell out of the server's window; broken: cut mid-way, rest lost; resumed: cut and read on, nothing lost).",
            "outcome",
            &[
                ("skipped", r.events_skipped_segments),
                ("broken", r.events_broken_segments),
                ("resumed", r.events_resumed_segments),
            ],
        )?;
        out.counter(
            "client_events_reconnects",
            "Trickle server outages the events subscription reconnected through.",
            r.events_reconnects,
        )?;
        out.counter(
            "client_request_timeouts",
            "Control requests that got no answer in time.",
            r.request_timeouts,
        )?;
        let l = latency(&LATENCY_BOUNDS_MS);
        let bounds: Vec<f64> = LATENCY_BOUNDS_MS
            .iter()
            .map(|&ms| ms as f64 / 1000.0)
            .collect();
        out.histogram(
            "client_relay_latency_seconds",
            "Origin (the envelope's timestamp) to relay (handed to the egress sink), per relayed envelope.",
            &bounds,
            &l.counts,
            l.sum_ms / 1000.0,
        )?;
        egress_families(out, &egress)
    })
}

fn egress_families(out: &mut Out<'_>, egress: &relay::client::egress::EgressSinks) -> fmt::Result {
    let Some(sink) = &egress.sink else {
        return Ok(());
    };
    let (name, s) = (sink.name(), sink.stats());
    out.counters_by(
        "client_egress_events",
        "Events the egress sink resolved, by sink and outcome.",
        ["sink", "outcome"],
        &[
            ([name, "emitted"], s.emitted),
            ([name, "delivered"], s.delivered),
            ([name, "dropped"], s.dropped()),
        ],
    )?;
    out.gauges(
        "client_egress_queued",
        "Events the egress sink holds now (buffered, not yet delivered or dropped).",
        "sink",
        &[(name, s.queued)],
    )?;
    out.counters(
        "client_egress_write_errors",
        "Failed writes of the egress sink to its destination.",
        "sink",
        &[(name, s.write_errors)],
    )?;
    out.counters(
        "client_egress_loss_reports",
        "telemetry_dropped reports the egress sink stored about its own drops.",
        "sink",
        &[(name, s.reports)],
    )?;
    if let Some(k) = &egress.kafka {
        let k = k.kafka_stats();
        out.counter(
            "client_kafka_acks",
            "Records the Kafka broker acknowledged.",
            k.delivered,
        )?;
        out.counter(
            "client_kafka_retries",
            "Re-sends of failed records after a backoff.",
            k.retries,
        )?;
        out.counter(
            "client_kafka_timeouts",
            "Delivery reports that timed out (message.timeout.ms); the record is produced again.",
            k.timed_out,
        )?;
        out.counter(
            "client_kafka_delivery_failures",
            "Delivery reports with an error (timeouts included).",
            k.delivery_failures,
        )?;
        out.counter(
            "client_kafka_producer_restarts",
            "Kafka producers replaced (before a retry, after a fatal error).",
            k.producer_restarts,
        )?;
        out.counter(
            "client_kafka_broker_errors",
            "Error events from librdkafka (broker unreachable and the like).",
            k.broker_errors,
        )?;
    }
    let Some(reporter) = &egress.reporter else {
        return Ok(());
    };
    let r = reporter.reporter_stats();
    out.counter(
        "client_reporter_requests",
        "Requests the HTTP reporter made to /v1/metrics.",
        r.requests,
    )?;
    out.counters(
        "client_reporter_answers",
        "The HTTP reporter's requests by answer (2xx, 400, 413: resolved; the rest retried; network: no answer).",
        "status",
        &[
            ("2xx", r.status_2xx),
            ("400", r.status_400),
            ("413", r.status_413),
            ("401", r.status_401),
            ("429", r.status_429),
            ("5xx", r.status_5xx),
            ("other", r.status_other),
            ("network", r.network_errors),
        ],
    )?;
    out.counter(
        "client_reporter_retries",
        "Sends of a batch that failed before.",
        r.retries,
    )?;
    out.gauges(
        "client_spool_events",
        "Events the HTTP reporter buffers now, by where.",
        "store",
        &[("disk", r.buffered_disk), ("memory", r.buffered_memory)],
    )?;
    out.gauge(
        "client_spool_bytes",
        "Bytes of the HTTP reporter's disk buffer now (segment files, framing included).",
        r.buffered_disk_bytes,
    )?;
    out.counter(
        "client_spool_disk_errors",
        "Failed disk operations of the reporter's buffer.",
        r.disk_errors,
    )
}

/// The collector's families, read from [`collector::Collector::stats`].
pub fn collector(c: collector::Collector) -> Probe {
    Probe::new(move |out| {
        let s = c.stats();
        let r = s.rejected;
        out.counters(
            "collector_requests",
            "POST /v1/metrics requests by answer (200 ok, or the reason of a refusal).",
            "status",
            &[
                ("200", s.batches),
                ("401", r.unauthorized),
                ("429", r.rate_limited),
                ("413", r.too_large),
                ("400", r.bad_request),
                ("415", r.unsupported_encoding),
                ("503", r.output_failed + r.dedup_unavailable),
            ],
        )?;
        out.counter(
            "collector_events_accepted",
            "Events written to the output.",
            s.accepted,
        )?;
        out.counter(
            "collector_duplicates",
            "Events skipped because their id was already accepted.",
            s.duplicates,
        )?;
        out.counter(
            "collector_rate_limited",
            "Requests refused by the per-key rate limit (429).",
            r.rate_limited,
        )?;
        out.counters(
            "collector_unavailable",
            "Requests answered 503, by cause (output: the output failed; dedup: the shared dedup store).",
            "cause",
            &[("output", r.output_failed), ("dedup", r.dedup_unavailable)],
        )?;
        out.counter(
            "collector_output_errors",
            "Requests whose write to the output failed (answered 503).",
            r.output_failed,
        )?;
        let l = c.output_latency();
        let bounds: Vec<f64> = collector::OUTPUT_LATENCY_BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .collect();
        out.histogram(
            "collector_output_latency_seconds",
            "How long each write of accepted events to the output took (fsync or Kafka acknowledgement included).",
            &bounds,
            &l.counts,
            l.sum_us as f64 / 1e6,
        )?;
        let Some(h) = c.redis_dedup_health() else {
            return Ok(());
        };
        out.gauge(
            "collector_dedup_store_up",
            "1 while the shared dedup store (Redis) answers, else 0.",
            u64::from(h.reachable),
        )?;
        out.gauge(
            "collector_dedup_repair_backlog",
            "Ids whose commit or release waits for Redis now.",
            h.repair_backlog as u64,
        )?;
        out.counter(
            "collector_dedup_repairs_given_up",
            "Ids whose repair was given up (queue full): each may be written twice.",
            h.repairs_given_up,
        )?;
        out.counter(
            "collector_dedup_claims_lost",
            "Commits that found their id claimed by another request (a claim expired mid-write).",
            h.claims_lost,
        )
    })
}
