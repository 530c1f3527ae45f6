//! The server's counters: requests by route and status class, bytes, segments, refusals by
//! limit, and the gauges of what is open now. Each is one relaxed atomic add on its path; they
//! are read whole by [`Channels::stats`](super::Channels::stats) (what `GET /metrics` exports).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The routes a request is counted under (a bounded set: never a channel name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// `POST /{channel}`.
    CreateChannel,
    /// `DELETE /{channel}`.
    DeleteChannel,
    /// `GET /{channel}/{seq}`.
    SegmentGet,
    /// `GET /{channel}/next`.
    SegmentNext,
    /// `POST /{channel}/{seq}`.
    SegmentPost,
    /// `DELETE /{channel}/{seq}`.
    SegmentDelete,
    /// Anything else: unknown paths, wrong methods, unreadable request heads.
    Other,
}

impl RouteKind {
    const ALL: [RouteKind; ROUTES] = [
        RouteKind::CreateChannel,
        RouteKind::DeleteChannel,
        RouteKind::SegmentGet,
        RouteKind::SegmentNext,
        RouteKind::SegmentPost,
        RouteKind::SegmentDelete,
        RouteKind::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            RouteKind::CreateChannel => "create_channel",
            RouteKind::DeleteChannel => "delete_channel",
            RouteKind::SegmentGet => "segment_get",
            RouteKind::SegmentNext => "segment_next",
            RouteKind::SegmentPost => "segment_post",
            RouteKind::SegmentDelete => "segment_delete",
            RouteKind::Other => "other",
        }
    }
}

const ROUTES: usize = 7;
/// Status classes: 2xx, 3xx, 4xx, 5xx, and no answer (the connection broke first).
const CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "none"];

fn class_of(status: u16) -> usize {
    match status {
        200..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        500..=599 => 3,
        _ => 4,
    }
}

/// The live counters (in the registry, so every route and the in-process API reach them).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: [[AtomicU64; CLASSES.len()]; ROUTES],
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) segments: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) refused_channels: AtomicU64,
    pub(crate) refused_segment_bytes: AtomicU64,
    pub(crate) refused_request_head: AtomicU64,
    connections_open: AtomicU64,
    subscribers: AtomicU64,
    publishers: AtomicU64,
}

/// Holds one unit of a gauge while alive (an open connection, a streaming GET, a POST).
pub(crate) struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn hold(gauge: &AtomicU64) -> Held<'_> {
    gauge.fetch_add(1, Relaxed);
    Held(gauge)
}

impl Counters {
    /// One request answered `status` (0: no answer was written).
    pub(crate) fn request(&self, route: RouteKind, status: u16) {
        self.requests[route as usize][class_of(status)].fetch_add(1, Relaxed);
    }

    /// A request head that could not be read, answered `status` (431: over the head limit).
    pub(crate) fn bad_head(&self, status: u16) {
        if status == 431 {
            self.refused_request_head.fetch_add(1, Relaxed);
        }
        self.request(RouteKind::Other, status);
    }

    /// An open connection, for as long as the guard lives.
    pub(crate) fn connection(&self) -> Held<'_> {
        hold(&self.connections_open)
    }

    /// A GET streaming (or waiting for) a segment, for as long as the guard lives.
    pub(crate) fn subscriber(&self) -> Held<'_> {
        hold(&self.subscribers)
    }

    /// A POST writing (or preconnected to) a segment, for as long as the guard lives.
    pub(crate) fn publisher(&self) -> Held<'_> {
        hold(&self.publishers)
    }

    pub(crate) fn snapshot(&self, channels: usize, connections_total: u64) -> ServerStats {
        let mut requests = Vec::with_capacity(ROUTES * CLASSES.len());
        for route in RouteKind::ALL {
            for (i, class) in CLASSES.iter().enumerate() {
                requests.push(RequestCount {
                    route: route.name(),
                    class,
                    count: self.requests[route as usize][i].load(Relaxed),
                });
            }
        }
        ServerStats {
            channels: channels as u64,
            connections_open: self.connections_open.load(Relaxed),
            connections_total,
            subscribers: self.subscribers.load(Relaxed),
            publishers: self.publishers.load(Relaxed),
            segments: self.segments.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            requests,
            refused: Refused {
                connections: self.refused_connections.load(Relaxed),
                channels: self.refused_channels.load(Relaxed),
                segment_bytes: self.refused_segment_bytes.load(Relaxed),
                request_head: self.refused_request_head.load(Relaxed),
            },
        }
    }
}

/// A point-in-time copy of a server's counters (monotonic, except the "now" gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    /// Now: channels that exist.
    pub channels: u64,
    /// Now: open connections (at most `max_connections`).
    pub connections_open: u64,
    /// Connections accepted (within the limit) since the start.
    pub connections_total: u64,
    /// Now: GETs streaming a segment or waiting for its data.
    pub subscribers: u64,
    /// Now: POSTs writing a segment or preconnected to one.
    pub publishers: u64,
    /// Segments that received data.
    pub segments: u64,
    /// Segment body bytes received.
    pub bytes_in: u64,
    /// Segment body bytes sent to readers.
    pub bytes_out: u64,
    /// Requests by route and status class (every combination, zeros included).
    pub requests: Vec<RequestCount>,
    /// Refusals by the limit that caused them.
    pub refused: Refused,
}

/// Requests of one route answered with one status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    /// `create_channel`, `delete_channel`, `segment_get`, `segment_next`, `segment_post`,
    /// `segment_delete` or `other`.
    pub route: &'static str,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `none` (the connection broke before an answer).
    pub class: &'static str,
    /// How many.
    pub count: u64,
}

/// Refusals by limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Connections past `max_connections` (answered 503 and closed).
    pub connections: u64,
    /// Channels past `max_channels` (503).
    pub channels: u64,
    /// Segments past `max_segment_bytes` (413).
    pub segment_bytes: u64,
    /// Request heads past 16 KiB or 64 headers (431).
    pub request_head: u64,
}

impl ServerStats {
    /// Requests of `route` in status `class`.
    pub fn requests_of(&self, route: &str, class: &str) -> u64 {
        self.requests
            .iter()
            .find(|r| r.route == route && r.class == class)
            .map_or(0, |r| r.count)
    }
}
