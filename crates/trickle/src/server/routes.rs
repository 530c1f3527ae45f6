//! Request to handler: the trickle routes, with the reference server's statuses, bodies and headers.

use super::channel::{Channel, ForRead, Lookup};
use super::http::{
    error_response, fixed_response, start_response, write_all_vectored, Body, Conn, Head, Method,
    CONTINUE,
};
use super::segment::{Append, Read, Segment};
use super::stats::RouteKind;
use super::{Ctx, ServerError};
use crate::headers::{CLOSED, LATEST, SEQ};
use bytes::Bytes;
use std::io::{self, IoSlice, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Most chunks sent in one vectored write (well under IOV_MAX).
const MAX_BATCH: usize = 64;
/// A streaming GET stops reading (pipelined) request bytes past this much.
const PIPELINE_CAP: usize = 64 * 1024;
/// Largest sequence number accepted, so that `seq + 1` never overflows.
const MAX_SEQ: i64 = i64::MAX / 2;
/// Shortest keepalive interval, so a zero in the config cannot spin.
const MIN_KEEPALIVE: std::time::Duration = std::time::Duration::from_millis(10);

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Ready for the next request.
    KeepAlive,
    /// Answered; close gracefully.
    Close,
    /// The socket is broken or the response was cut short: drop it.
    Abort,
}

enum Route<'a> {
    Channel(&'a str),
    Segment(&'a str, &'a str),
    NotFound,
}

fn route<'a>(base: &str, path: &'a str) -> Route<'a> {
    let Some(rest) = path.strip_prefix(base) else {
        return Route::NotFound;
    };
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ch), None, _) if !ch.is_empty() => Route::Channel(ch),
        (Some(ch), Some(idx), None) if !ch.is_empty() && !idx.is_empty() => Route::Segment(ch, idx),
        _ => Route::NotFound,
    }
}

/// A sequence number from the path: an integer from -2 up; anything else is `Invalid idx`.
fn parse_seq(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().filter(|n| (-2..=MAX_SEQ).contains(n))
}

/// One request, start to finish. `ready_at` is the serial the connection got when it became
/// ready for this request (what a DELETE racing it compares with).
pub(crate) async fn handle(ctx: &Ctx, conn: &mut Conn, head: Head, ready_at: u64) -> Outcome {
    let mut body = Body::new(head.body);
    let mut req = Req {
        ctx,
        conn,
        head: &head,
        body: &mut body,
        ready_at,
        status: 0,
    };
    let (kind, outcome) = match (head.method, route(&ctx.base, &head.path)) {
        (Method::Post, Route::Channel(name)) => (RouteKind::CreateChannel, req.create(name).await),
        (Method::Delete, Route::Channel(name)) => {
            (RouteKind::DeleteChannel, req.delete_channel(name).await)
        }
        (_, Route::Channel(_)) => {
            let allow = [("Allow", "DELETE, POST")];
            let outcome = req.error(405, &allow, "Method Not Allowed", false).await;
            (RouteKind::Other, outcome)
        }
        (Method::Get, Route::Segment(name, "next")) => {
            (RouteKind::SegmentNext, req.next(name).await)
        }
        (Method::Get, Route::Segment(name, idx)) => {
            (RouteKind::SegmentGet, req.get(name, idx).await)
        }
        (Method::Post, Route::Segment(name, idx)) => {
            (RouteKind::SegmentPost, req.post(name, idx).await)
        }
        (Method::Delete, Route::Segment(name, idx)) => (
            RouteKind::SegmentDelete,
            req.delete_segment(name, idx).await,
        ),
        (_, Route::Segment(..)) => {
            let allow = [("Allow", "DELETE, GET, POST")];
            let outcome = req.error(405, &allow, "Method Not Allowed", false).await;
            (RouteKind::Other, outcome)
        }
        (_, Route::NotFound) => (
            RouteKind::Other,
            req.error(404, &[], "404 page not found", false).await,
        ),
    };
    ctx.registry.counters.request(kind, req.status);
    outcome
}

struct Req<'a> {
    ctx: &'a Ctx,
    conn: &'a mut Conn,
    head: &'a Head,
    body: &'a mut Body,
    /// The serial the connection got when it became ready for this request.
    ready_at: u64,
    /// The status answered (0: none yet), for the request counters.
    status: u16,
}

impl Req<'_> {
    /// Whether the connection can serve another request after this response.
    fn reusable(&mut self) -> bool {
        !self.head.close
            && !self.ctx.registry.is_shutting_down()
            && self.body.finish_buffered(&mut self.conn.buf)
    }

    async fn send(&mut self, bytes: Vec<u8>, keep: bool) -> Outcome {
        match self.conn.write(&bytes).await {
            Ok(()) if keep => Outcome::KeepAlive,
            Ok(()) => Outcome::Close,
            Err(_) => Outcome::Abort,
        }
    }

    /// An error answer; `close` forces the connection closed (to wake a preconnected client).
    async fn error(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        msg: &str,
        close: bool,
    ) -> Outcome {
        let keep = !close && self.reusable();
        self.status = status;
        let bytes = error_response(status, headers, msg, !keep);
        self.send(bytes, keep).await
    }

    /// A 200 with the given headers and body.
    async fn ok(&mut self, headers: &[(&str, &str)], body: &[u8], close: bool) -> Outcome {
        let keep = !close && self.reusable();
        self.status = 200;
        let bytes = fixed_response(200, headers, body, !keep);
        self.send(bytes, keep).await
    }

    async fn refused(&mut self, lookup: Lookup) -> Outcome {
        match lookup {
            Lookup::NotFound => self.error(404, &[], "Stream not found", true).await,
            Lookup::ShuttingDown => self.error(503, &[], "server is shutting down", true).await,
            Lookup::Refused(e @ ServerError::TooManyChannels { .. }) => {
                self.error(503, &[], &e.to_string(), true).await
            }
            Lookup::Refused(e @ ServerError::InvalidName(_)) => {
                self.error(400, &[], &e.to_string(), true).await
            }
        }
    }

    /// `POST /{channel}`: create (autocreate only); `Expect-Content` is the MIME type.
    async fn create(&mut self, name: &str) -> Outcome {
        let mime = self.head.expect_content.clone().unwrap_or_default();
        match self.ctx.registry.get_or_create_for(
            name,
            &mime,
            self.ctx.autocreate,
            Some(self.ready_at),
        ) {
            Ok(_) => self.ok(&[], b"", false).await,
            Err(Lookup::NotFound) => self.error(404, &[], "Stream not found", false).await,
            Err(e) => self.refused(e).await,
        }
    }

    /// `DELETE /{channel}`.
    async fn delete_channel(&mut self, name: &str) -> Outcome {
        if self.ctx.registry.close(name) {
            self.ok(&[], b"", false).await
        } else {
            self.error(400, &[], "Invalid stream", false).await
        }
    }

    /// `DELETE /{channel}/{seq}`.
    async fn delete_segment(&mut self, name: &str, idx: &str) -> Outcome {
        let Some(ch) = self.ctx.registry.get(name) else {
            return self.error(404, &[], "Stream not found", false).await;
        };
        let Some(seq) = parse_seq(idx).filter(|s| *s >= 0) else {
            return self.error(400, &[], "Invalid idx", false).await;
        };
        if ch.close_seq(seq) {
            self.ok(&[], b"", false).await
        } else {
            self.error(400, &[], "Nonexistent segment", false).await
        }
    }

    /// `GET /{channel}/next`: the write head, as body and `Lp-Trickle-Latest`.
    async fn next(&mut self, name: &str) -> Outcome {
        let Some(ch) = self.ctx.registry.get(name) else {
            return self.error(404, &[], "Stream not found", false).await;
        };
        let next = ch.next().to_string();
        self.ok(
            &[
                (LATEST, &next),
                ("Content-Type", "text/plain; charset=utf-8"),
            ],
            next.as_bytes(),
            false,
        )
        .await
    }

    /// `GET /{channel}/{seq}`.
    async fn get(&mut self, name: &str, idx: &str) -> Outcome {
        let Some(ch) = self.ctx.registry.get(name) else {
            return self.error(404, &[], "Stream not found", false).await;
        };
        let Some(seq) = parse_seq(idx) else {
            return self.error(400, &[], "Invalid idx", false).await;
        };
        match ch.for_read(seq) {
            ForRead::Missing { seq, latest } => {
                let keep = self.reusable();
                let (seq, latest) = (seq.to_string(), latest.to_string());
                self.status = 470;
                let bytes = fixed_response(
                    470,
                    &[
                        (LATEST, &latest),
                        (SEQ, &seq),
                        ("Content-Type", "text/plain; charset=utf-8"),
                    ],
                    b"Entry not found",
                    !keep,
                );
                self.send(bytes, keep).await
            }
            ForRead::Closed { seq, .. } => self.empty_close(&ch, seq).await,
            ForRead::Found { seg, latest } => self.stream(&ch, seg, latest).await,
        }
    }

    /// A segment that ended without data: 200, empty, with the live edge (and `terminated`
    /// when the channel is gone).
    async fn empty_close(&mut self, ch: &Channel, seq: i64) -> Outcome {
        let (closed, latest) = ch.status();
        let (seq, latest) = (seq.to_string(), latest.to_string());
        let mut headers = vec![(SEQ, seq.as_str()), (LATEST, latest.as_str())];
        if closed {
            headers.push((CLOSED, "terminated"));
        }
        self.ok(&headers, b"", false).await
    }

    /// Streams a segment: what it holds, then the rest as it arrives, until it closes.
    async fn stream(&mut self, ch: &Channel, seg: Arc<Segment>, latest: i64) -> Outcome {
        let _reading = seg.reading();
        let counters = &self.ctx.registry.counters;
        let _subscriber = counters.subscriber();
        let chunked = !self.head.http10;
        let keep = chunked && self.reusable();
        let mut pos = 0usize;
        let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
        let mut prefix: Vec<u8> = Vec::with_capacity(256);
        let mut started = false;
        loop {
            batch.clear();
            match seg.read_from(pos, &mut batch, MAX_BATCH) {
                Read::Data => {
                    pos += batch.len();
                    prefix.clear();
                    if !started {
                        started = true;
                        self.status = 200;
                        data_head(&mut prefix, ch, &seg, latest, chunked, keep);
                    }
                    let size: usize = batch.iter().map(Bytes::len).sum();
                    if chunked {
                        let _ = write!(prefix, "{size:x}\r\n");
                    }
                    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() + 2);
                    iov.push(IoSlice::new(&prefix));
                    iov.extend(batch.iter().map(|b| IoSlice::new(b)));
                    if chunked {
                        iov.push(IoSlice::new(b"\r\n"));
                    }
                    if write_all_vectored(&mut self.conn.io, &mut iov)
                        .await
                        .is_err()
                    {
                        return Outcome::Abort;
                    }
                    counters.bytes_out.fetch_add(size as u64, Relaxed);
                }
                Read::Eof if !started => return self.empty_close(ch, seg.seq()).await,
                Read::Eof if !chunked => return Outcome::Close,
                Read::Eof => {
                    return match self.conn.write(b"0\r\n\r\n").await {
                        Ok(()) if keep => Outcome::KeepAlive,
                        Ok(()) => Outcome::Close,
                        Err(_) => Outcome::Abort,
                    };
                }
                // Evicted mid-stream: cut the response so the reader knows it is incomplete.
                Read::Evicted if started => return Outcome::Abort,
                Read::Evicted => return self.empty_close(ch, seg.seq()).await,
                Read::Wait => {
                    let notified = seg.data_notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if seg.has_news(pos) {
                        continue;
                    }
                    if self.conn.buf.len() >= PIPELINE_CAP {
                        notified.await;
                        continue;
                    }
                    // Wait for data, watching the socket so a vanished client ends the wait.
                    tokio::select! {
                        _ = notified.as_mut() => {}
                        r = self.conn.fill() => match r {
                            Ok(0) | Err(_) => return Outcome::Abort,
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
    }

    /// `POST /{channel}/{seq}`: stream the body into the segment.
    async fn post(&mut self, name: &str, idx: &str) -> Outcome {
        let ctx = self.ctx;
        let Some(seq) = parse_seq(idx).filter(|s| *s >= -1) else {
            if ctx.autocreate || ctx.registry.get(name).is_some() {
                return self.error(400, &[], "Invalid idx", false).await;
            }
            return self.error(404, &[], "Stream not found", true).await;
        };
        let mime = self.head.content_type.clone().unwrap_or_default();
        let ch =
            match ctx
                .registry
                .get_or_create_for(name, &mime, ctx.autocreate, Some(self.ready_at))
            {
                Ok(ch) => ch,
                Err(e) => return self.refused(e).await,
            };
        let Some(w) = ch.for_write(seq, self.head.reset) else {
            return self.error(404, &[], "Stream not found", true).await;
        };
        if self.head.expect_continue
            && !self.body.is_done()
            && self.conn.write(CONTINUE).await.is_err()
        {
            return Outcome::Abort;
        }
        match w.writer {
            Some(writer) => {
                let _writing = w.seg.writing();
                let _publisher = self.ctx.registry.counters.publisher();
                self.write_segment(&ch, &w.seg, w.seq, writer).await
            }
            None => self.discard_body(w.seq).await,
        }
    }

    /// The 200 that ends a POST.
    async fn posted(&mut self, seq: i64, terminated: bool, close: bool) -> Outcome {
        let seq = seq.to_string();
        let mut headers = vec![(SEQ, seq.as_str())];
        if terminated {
            headers.push((CLOSED, "terminated"));
        }
        self.ok(&headers, b"", close).await
    }

    /// A body that cannot be read further.
    async fn body_failed(&mut self, e: io::Error) -> Outcome {
        if e.kind() == io::ErrorKind::InvalidData {
            let msg = format!("malformed request body: {e}");
            self.error(400, &[], &msg, true).await
        } else {
            Outcome::Abort
        }
    }

    async fn too_large(&mut self) -> Outcome {
        let msg = format!(
            "segment exceeds the server's max_segment_bytes ({} bytes); rotate segments sooner or raise --max-segment-bytes",
            self.ctx.max_segment_bytes
        );
        let counters = &self.ctx.registry.counters;
        counters.refused_segment_bytes.fetch_add(1, Relaxed);
        self.error(413, &[], &msg, true).await
    }

    /// Reads and drops a body (a rewrite of a segment that already has data).
    async fn discard_body(&mut self, seq: i64) -> Outcome {
        let mut total = 0u64;
        loop {
            match self.body.next(self.conn).await {
                Ok(Some(b)) => {
                    total += b.len() as u64;
                    let counters = &self.ctx.registry.counters;
                    counters.bytes_in.fetch_add(b.len() as u64, Relaxed);
                    if total > self.ctx.max_segment_bytes {
                        return self.too_large().await;
                    }
                }
                Ok(None) => return self.posted(seq, false, false).await,
                Err(e) => return self.body_failed(e).await,
            }
        }
    }

    /// Writes the body into the segment: first waits (with `100 Continue` keepalives) for the
    /// first byte, then streams; the segment closes when the body ends.
    async fn write_segment(
        &mut self,
        ch: &Channel,
        seg: &Segment,
        seq: i64,
        writer: u64,
    ) -> Outcome {
        let closed = seg.wait_closed();
        tokio::pin!(closed);
        let interval = self.ctx.keepalive.max(MIN_KEEPALIVE);
        let keepalive = tokio::time::sleep(interval);
        tokio::pin!(keepalive);

        // Phase 1: a preconnected POST waits for its first byte.
        let first = loop {
            tokio::select! {
                biased;
                r = self.body.next(self.conn) => match r {
                    Ok(Some(b)) => break b,
                    Ok(None) => {
                        ch.skip_past(seq);
                        seg.close();
                        return self.posted(seq, false, false).await;
                    }
                    // Left open and claimable: the publisher's retry can still write it.
                    Err(e) => return self.body_failed(e).await,
                },
                _ = &mut closed => {
                    // Deleted, reset or evicted before any byte: wake the publisher.
                    let gone = ch.is_closed();
                    if !gone {
                        ch.skip_past(seq);
                    }
                    return self.posted(seq, gone, true).await;
                }
                _ = &mut keepalive => {
                    if self.conn.write(CONTINUE).await.is_err() {
                        return Outcome::Abort;
                    }
                    keepalive.as_mut().reset(tokio::time::Instant::now() + interval);
                }
            }
        };

        // Phase 2: stream into the segment.
        let mut total = 0u64;
        let mut owner = true;
        let mut storing = true;
        let mut closed_seen = false;
        let mut piece = Some(first);
        loop {
            if let Some(b) = piece.take() {
                total += b.len() as u64;
                let counters = &self.ctx.registry.counters;
                counters.bytes_in.fetch_add(b.len() as u64, Relaxed);
                if total > self.ctx.max_segment_bytes {
                    if owner {
                        seg.close();
                    }
                    return self.too_large().await;
                }
                if storing {
                    match seg.append(writer, b) {
                        Append::Stored { first: true } => {
                            ch.first_byte(seq);
                            self.ctx.registry.counters.segments.fetch_add(1, Relaxed);
                        }
                        Append::Stored { first: false } => {}
                        Append::Closed => storing = false,
                        Append::Superseded => {
                            storing = false;
                            owner = false;
                        }
                    }
                    // Let the woken readers send this piece while it is still in cache,
                    // instead of reading far ahead of them.
                    tokio::task::yield_now().await;
                }
            }
            tokio::select! {
                biased;
                _ = &mut closed, if !closed_seen => {
                    closed_seen = true;
                    storing = false;
                    if ch.is_closed() {
                        // The channel is gone: tell the publisher now instead of draining.
                        return self.posted(seq, true, true).await;
                    }
                }
                r = self.body.next(self.conn) => match r {
                    Ok(Some(b)) => piece = Some(b),
                    Ok(None) => break,
                    Err(e) => {
                        // The publisher vanished mid-segment: readers keep what arrived.
                        if owner {
                            seg.close();
                        }
                        return self.body_failed(e).await;
                    }
                },
            }
        }
        if owner {
            seg.close();
        }
        self.posted(seq, false, false).await
    }
}

/// The head of a successful segment GET.
fn data_head(
    out: &mut Vec<u8>,
    ch: &Channel,
    seg: &Segment,
    latest: i64,
    chunked: bool,
    keep: bool,
) {
    let seq = seg.seq().to_string();
    let latest_s = latest.to_string();
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(6);
    headers.push((SEQ, &seq));
    if seg.seq() != latest {
        headers.push((LATEST, &latest_s));
    }
    headers.push(("Content-Type", ch.mime()));
    if chunked {
        headers.push(("Transfer-Encoding", "chunked"));
    }
    if !keep {
        headers.push(("Connection", "close"));
    }
    start_response(out, 200, &headers);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route("/", "/abc"), Route::Channel("abc")));
        assert!(matches!(route("/", "/abc/3"), Route::Segment("abc", "3")));
        assert!(matches!(route("/", "/abc/3/x"), Route::NotFound));
        assert!(matches!(route("/", "/"), Route::NotFound));
        assert!(matches!(route("/", "/abc/"), Route::NotFound));
        assert!(matches!(route("/ai/", "/abc"), Route::NotFound));
        assert!(matches!(
            route("/ai/", "/ai/abc/-1"),
            Route::Segment("abc", "-1")
        ));
    }

    #[test]
    fn seqs() {
        assert_eq!(parse_seq("0"), Some(0));
        assert_eq!(parse_seq("-2"), Some(-2));
        assert_eq!(parse_seq("-3"), None);
        assert_eq!(parse_seq("abc"), None);
        assert_eq!(parse_seq("1.5"), None);
        assert_eq!(parse_seq("99999999999999999999"), None);
    }
}
