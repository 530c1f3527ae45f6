//! Helpers shared by the trickle crate's integration tests (each includes this with `mod common;`).
#![allow(dead_code)]

use std::time::Duration;
use trickle::server::{Channels, SegmentInfo, Server, ServerConfig};

/// A trickle server with autocreate on, on a free loopback port.
pub async fn autocreate_server() -> Server {
    Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            autocreate: true,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Polls `cond` every 10 ms until it holds; fails the test naming `what` after `limit`.
pub async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The segment `seq` of channel `name`, as the server sees it now.
pub fn segment(channels: &Channels, name: &str, seq: i64) -> Option<SegmentInfo> {
    channels.segments(name)?.into_iter().find(|s| s.seq == seq)
}

/// Waits (up to 10 s) until segment `seq` of channel `name` has at least `readers` GETs and
/// `writers` POSTs on it: the requests the test started are parked at the server, not still on
/// their way (what a fixed sleep used to stand in for).
pub async fn parked(channels: &Channels, name: &str, seq: i64, readers: usize, writers: usize) {
    until(
        &format!("{readers} reader(s) and {writers} writer(s) on {name}/{seq}"),
        Duration::from_secs(10),
        || {
            segment(channels, name, seq)
                .is_some_and(|s| s.readers >= readers && s.writers >= writers)
        },
    )
    .await;
}
