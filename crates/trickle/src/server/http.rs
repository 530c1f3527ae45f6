//! Just enough HTTP/1.1 for trickle: request heads (httparse), streamed request bodies
//! (Content-Length and chunked), fixed responses, and vectored writes for streamed ones, over
//! plain TCP or TLS ([`Io`]).
//!
//! Message framing follows RFC 9112 strictly, because a server that reads a body's length
//! differently from a proxy in front of it can be made to take the rest of one request for the
//! start of another (request smuggling). Each of these is answered 400 and the connection closed,
//! so nothing sent behind it on that connection is ever served:
//! - both `Content-Length` and `Transfer-Encoding` (section 6.3, rule 3);
//! - a `Transfer-Encoding` whose final coding is not `chunked`, or that applies `chunked` twice
//!   (sections 6.3 rule 4, and 6.1);
//! - `Transfer-Encoding` in an HTTP/1.0 request (section 6.1);
//! - a `Content-Length` that is not plain decimal digits (a sign, a list, spaces inside), or
//!   several that differ (section 6.3, rule 5; RFC 9110 section 8.6);
//! - a chunk size that is not plain hex digits (section 7.1).
//!
//! A coding other than `chunked` before the final `chunked` (e.g. `gzip, chunked`) is one the
//! server does not implement: 501 and close (section 6.1). A body shorter than its
//! `Content-Length` when the client closes is incomplete: no answer, the connection is dropped
//! (section 6.3, rule 6). A request with neither header has no body (rule 7), so what follows
//! its head is the next request.

use bytes::{Buf, Bytes, BytesMut};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Largest request head accepted (request line and headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 4096;
/// Most trailer lines accepted after a chunked body.
const MAX_TRAILERS: usize = 64;
/// Most bytes reserved for one body read: a body that keeps filling its reads ramps up to it.
const READ_RESERVE: usize = 128 * 1024;
/// Bytes reserved for a body's first read (a telemetry line is ~500 B; video ramps up).
const BODY_RESERVE: usize = 4 * 1024;
/// Bytes reserved for reading heads and watching idle connections: a trickle request head is
/// ~200 B, and ten thousand sessions hold ~80,000 connections, most of them waiting.
const SMALL_RESERVE: usize = 1024;
/// Below this many spare bytes the buffer is topped up before a small read.
const SMALL_SPARE: usize = 256;
/// Body pieces at least this big are split off the read buffer without copying; smaller ones are
/// copied, so a tiny piece never pins a whole read buffer in a segment.
const ZERO_COPY_MIN: usize = 32 * 1024;

/// The interim response the server repeats while a preconnected POST is idle.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// An accepted connection's byte stream: plain TCP, or TLS over it.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection: its stream and the bytes read but not yet parsed. Reads and writes never
/// overlap (every use goes through `&mut Conn`), so the stream is not split.
pub(crate) struct Conn {
    pub(crate) io: Io,
    pub(crate) buf: BytesMut,
    /// Bytes to reserve for the next body read: doubles while reads fill what was reserved.
    body_reserve: usize,
}

impl Conn {
    /// Wraps an accepted stream. Its buffer is allocated by the first read, small.
    pub(crate) fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            body_reserve: BODY_RESERVE,
        }
    }

    /// Between requests: an empty buffer grown for a body goes back to the allocator, so a
    /// connection that waits (keep-alive, or a long poll) holds ~1 KiB, not a body-sized buffer.
    pub(crate) fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > SMALL_RESERVE {
            self.buf = BytesMut::new();
        }
        self.body_reserve = BODY_RESERVE;
    }

    /// Reads more bytes into the buffer with a small reservation (heads, idle waits): an idle
    /// connection costs ~1 KiB, not a body-sized buffer. Ok(0) at end of stream.
    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < SMALL_SPARE {
            self.buf.reserve(SMALL_RESERVE);
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// Reads more body bytes. The reservation starts small (a telemetry segment's chunks are
    /// ~500 B) and doubles, up to [`READ_RESERVE`], while reads fill it, so a large body
    /// arrives in few reads and in pieces big enough to be shared without a copy.
    async fn fill_body(&mut self) -> io::Result<usize> {
        let spare = self.buf.capacity() - self.buf.len();
        if spare < self.body_reserve / 4 {
            self.buf.reserve(self.body_reserve);
        }
        let offered = self.buf.capacity() - self.buf.len();
        let n = self.io.read_buf(&mut self.buf).await?;
        if n == offered {
            self.body_reserve = (self.body_reserve * 2).min(READ_RESERVE);
        }
        Ok(n)
    }

    /// Writes all of `bytes` and flushes them (TLS holds written bytes until flushed).
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Closes gracefully: FIN our side, then read and drop what the client still sends for a
    /// moment, so that our response is not destroyed by a reset for unread data.
    pub(crate) async fn linger_close(mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        // Bounded: over TLS the shutdown writes a close_notify, which a peer that does not read
        // could hold up.
        let _ = tokio::time::timeout_at(deadline, self.io.shutdown()).await;
        let mut scratch = vec![0u8; 16 * 1024];
        let mut dropped = 0usize;
        while dropped < 4 * 1024 * 1024 {
            match tokio::time::timeout_at(deadline, self.io.read(&mut scratch)).await {
                Ok(Ok(n)) if n > 0 => dropped += n,
                _ => break,
            }
        }
    }
}

/// Request methods the server routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Delete,
    Other,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head, reduced to what trickle needs.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: Method,
    /// The path, without query string.
    pub(crate) path: String,
    pub(crate) http10: bool,
    /// The client asked to close after this request.
    pub(crate) close: bool,
    pub(crate) body: BodyKind,
    pub(crate) expect_continue: bool,
    pub(crate) content_type: Option<String>,
    pub(crate) expect_content: Option<String>,
    pub(crate) reset: bool,
}

/// Why no request head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The client closed (or went idle) between requests: nothing to answer.
    Closed,
    /// A malformed head: 400.
    Bad(&'static str),
    /// A head over the size or header-count limit: 431.
    TooLarge,
    /// A transfer coding other than chunked: 501.
    Unsupported,
}

/// Reads one request head from the connection.
pub(crate) async fn read_head(conn: &mut Conn) -> Result<Head, HeadError> {
    loop {
        // Tolerate stray CRLFs between requests (RFC 9112 section 2.2).
        while conn.buf.first().is_some_and(|b| *b == b'\r' || *b == b'\n') {
            conn.buf.advance(1);
        }
        if !conn.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&conn.buf) {
                Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
                    return Err(HeadError::TooLarge)
                }
                Ok(httparse::Status::Complete(n)) => {
                    let head = build_head(&req)?;
                    conn.buf.advance(n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {
                    if conn.buf.len() > MAX_HEAD {
                        return Err(HeadError::TooLarge);
                    }
                }
                Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
                Err(_) => return Err(HeadError::Bad("malformed request head")),
            }
        }
        match conn.fill().await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

fn build_head(req: &httparse::Request<'_, '_>) -> Result<Head, HeadError> {
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("/");
    // Absolute-form targets (proxies): keep only the path.
    let target = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map_or("/", |j| &target[i + 3 + j..]),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let http10 = req.version == Some(0);
    let mut head = Head {
        method,
        path,
        http10,
        close: http10,
        body: BodyKind::None,
        expect_continue: false,
        content_type: None,
        expect_content: None,
        reset: false,
    };
    let mut length: Option<u64> = None;
    // The transfer codings of every Transfer-Encoding header, in order; `None`: no such header.
    let mut codings: Option<Vec<String>> = None;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Bad("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // A list; empty elements are ignored (RFC 9110 section 5.6.1).
            codings.get_or_insert_with(Vec::new).extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_ascii_lowercase),
            );
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    // We still close HTTP/1.0 connections: their bodies end at close.
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("expect-content") {
            head.expect_content = Some(value.to_string());
        } else if name.eq_ignore_ascii_case(crate::headers::RESET) {
            head.reset = !value.is_empty() && value != "0" && !value.eq_ignore_ascii_case("false");
        }
    }
    head.body = match codings {
        Some(codings) => chunked_framing(&codings, length.is_some(), http10)?,
        None => match length {
            Some(0) | None => BodyKind::None,
            Some(n) => BodyKind::Length(n),
        },
    };
    Ok(head)
}

/// A Content-Length value: decimal digits only (no sign, list or inner space), at most 18 of
/// them so that it fits in a u64 with room to spare.
fn parse_content_length(value: &str) -> Result<u64, HeadError> {
    if value.is_empty() || value.len() > 18 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::Bad("invalid Content-Length"));
    }
    value
        .parse()
        .map_err(|_| HeadError::Bad("invalid Content-Length"))
}

/// The framing of a request that has a Transfer-Encoding (see the module docs for the rules).
fn chunked_framing(
    codings: &[String],
    has_length: bool,
    http10: bool,
) -> Result<BodyKind, HeadError> {
    if http10 {
        return Err(HeadError::Bad(
            "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)",
        ));
    }
    if has_length {
        return Err(HeadError::Bad(
            "both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)",
        ));
    }
    if codings.last().map(String::as_str) != Some("chunked") {
        return Err(HeadError::Bad(
            "Transfer-Encoding must end with chunked (RFC 9112 section 6.3)",
        ));
    }
    if codings.iter().filter(|c| *c == "chunked").count() > 1 {
        return Err(HeadError::Bad(
            "chunked applied more than once (RFC 9112 section 6.1)",
        ));
    }
    if codings.len() > 1 {
        return Err(HeadError::Unsupported);
    }
    Ok(BodyKind::Chunked)
}

/// The decoding state of a request body.
pub(crate) struct Body {
    state: BodyState,
    trailers: usize,
}

enum BodyState {
    Done,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
}

enum Step {
    Piece(Bytes),
    NeedMore,
    Done,
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Takes `n` bytes off the front of the buffer, sharing big pieces and copying small ones.
fn take(buf: &mut BytesMut, n: usize) -> Bytes {
    if n >= ZERO_COPY_MIN {
        buf.split_to(n).freeze()
    } else {
        let b = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        b
    }
}

/// One line (without its CRLF) at the front of the buffer, if complete.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    match window.iter().position(|b| *b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(bad("chunk line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional whitespace and `;extensions` (RFC 9112 7.1).
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|b| *b == b';').next().unwrap_or(&[]);
    let digits = std::str::from_utf8(digits)
        .map_err(|_| bad("invalid chunk size"))?
        .trim_end_matches([' ', '\t']);
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("invalid chunk size"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| bad("invalid chunk size"))
}

impl Body {
    /// The body a head announces.
    pub(crate) fn new(kind: BodyKind) -> Body {
        let state = match kind {
            BodyKind::None | BodyKind::Length(0) => BodyState::Done,
            BodyKind::Length(n) => BodyState::Length(n),
            BodyKind::Chunked => BodyState::ChunkSize,
        };
        Body { state, trailers: 0 }
    }

    /// Whether the whole body has been read.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    /// Decodes as far as the buffered bytes allow.
    fn step(&mut self, buf: &mut BytesMut) -> io::Result<Step> {
        loop {
            match self.state {
                BodyState::Done => return Ok(Step::Done),
                BodyState::Length(rem) | BodyState::ChunkData(rem) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (buf.len() as u64).min(rem);
                    let piece = take(buf, n as usize);
                    let rem = rem - n;
                    self.state = match self.state {
                        BodyState::Length(_) if rem == 0 => BodyState::Done,
                        BodyState::Length(_) => BodyState::Length(rem),
                        _ if rem == 0 => BodyState::ChunkEnd,
                        _ => BodyState::ChunkData(rem),
                    };
                    return Ok(Step::Piece(piece));
                }
                BodyState::ChunkSize => match take_line(buf)? {
                    None => return Ok(Step::NeedMore),
                    Some(line) => {
                        let size = parse_chunk_size(&line)?;
                        self.state = if size == 0 {
                            BodyState::Trailers
                        } else {
                            BodyState::ChunkData(size)
                        };
                    }
                },
                BodyState::ChunkEnd => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                    } else if buf.starts_with(b"\n") {
                        buf.advance(1);
                    } else if buf.is_empty() || buf[..] == b"\r"[..] {
                        return Ok(Step::NeedMore);
                    } else {
                        return Err(bad("missing CRLF after chunk data"));
                    }
                    self.state = BodyState::ChunkSize;
                }
                BodyState::Trailers => match take_line(buf)? {
                    None => return Ok(Step::NeedMore),
                    Some(line) if line.is_empty() => self.state = BodyState::Done,
                    Some(_) => {
                        self.trailers += 1;
                        if self.trailers > MAX_TRAILERS {
                            return Err(bad("too many trailer lines"));
                        }
                    }
                },
            }
        }
    }

    /// The next piece of the body (never empty), or `None` at its end.
    /// Cancel-safe: dropping the future loses nothing (bytes stay in the buffer).
    pub(crate) async fn next(&mut self, conn: &mut Conn) -> io::Result<Option<Bytes>> {
        loop {
            match self.step(&mut conn.buf)? {
                Step::Piece(b) => return Ok(Some(b)),
                Step::Done => return Ok(None),
                Step::NeedMore => {}
            }
            if conn.fill_body().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection mid-body",
                ));
            }
        }
    }

    /// Consumes the rest of the body if it is already buffered; true when it is all consumed.
    pub(crate) fn finish_buffered(&mut self, buf: &mut BytesMut) -> bool {
        loop {
            match self.step(buf) {
                Ok(Step::Done) => return true,
                Ok(Step::Piece(_)) => {}
                Ok(Step::NeedMore) | Err(_) => return false,
            }
        }
    }
}

/// The reason phrase of the statuses this server sends.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Request Entity Too Large",
        431 => "Request Header Fields Too Large",
        // What the reference (Go net/http) writes for its unregistered 470.
        470 => "status code 470",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Starts a response: status line and headers, without the blank line.
pub(crate) fn start_response(out: &mut Vec<u8>, status: u16, headers: &[(&str, &str)]) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status, reason(status));
    push_headers(out, headers);
}

/// Appends `name: value` lines.
pub(crate) fn push_headers(out: &mut Vec<u8>, headers: &[(&str, &str)]) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// A complete response with a fixed body.
pub(crate) fn fixed_response(
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    start_response(&mut out, status, headers);
    let len = body.len().to_string();
    push_headers(&mut out, &[("Content-Length", &len)]);
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// An error response in the reference's style (Go `http.Error`: text, newline-terminated).
pub(crate) fn error_response(
    status: u16,
    headers: &[(&str, &str)],
    msg: &str,
    close: bool,
) -> Vec<u8> {
    let mut all: Vec<(&str, &str)> = Vec::with_capacity(headers.len() + 2);
    all.extend_from_slice(headers);
    all.push(("Content-Type", "text/plain; charset=utf-8"));
    all.push(("X-Content-Type-Options", "nosniff"));
    let body = format!("{msg}\n");
    fixed_response(status, &all, body.as_bytes(), close)
}

/// Writes every slice, looping over partial vectored writes, then flushes.
pub(crate) async fn write_all_vectored(
    io: &mut Io,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(kind: BodyKind, input: &[u8]) -> io::Result<(Vec<u8>, bool)> {
        let mut body = Body::new(kind);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match body.step(&mut buf)? {
                Step::Piece(b) => out.extend_from_slice(&b),
                Step::NeedMore => return Ok((out, false)),
                Step::Done => return Ok((out, true)),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_buffer_starts_small_is_bounded_for_a_body_and_released_after_it() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        const BODY: usize = 1 << 20;
        let mut wire = format!("POST /c/0 HTTP/1.1\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
        wire.extend(std::iter::repeat_n(b'x', BODY));
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&wire).await.unwrap();
            s
        });
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Conn::new(Io::Plain(stream));
        assert_eq!(
            conn.buf.capacity(),
            0,
            "nothing allocated before the first read"
        );
        let head = read_head(&mut conn).await.unwrap();
        // A head (and an idle wait) costs ~1 KiB, not a body-sized buffer.
        assert!(
            conn.buf.capacity() <= SMALL_RESERVE,
            "{}",
            conn.buf.capacity()
        );
        let mut body = Body::new(head.body);
        let (mut got, mut largest_buffer) = (0, 0);
        while let Some(piece) = body.next(&mut conn).await.unwrap() {
            got += piece.len();
            largest_buffer = largest_buffer.max(conn.buf.capacity() + piece.len());
        }
        assert_eq!(got, BODY);
        // Reads reserve at most READ_RESERVE (an allocation growing in place may double), never
        // the body's size.
        assert!(
            largest_buffer <= 2 * READ_RESERVE + SMALL_RESERVE,
            "{largest_buffer}"
        );
        // Between requests the connection holds at most the small buffer again.
        conn.shrink();
        assert!(
            conn.buf.capacity() <= SMALL_RESERVE,
            "{}",
            conn.buf.capacity()
        );
        drop(client.await.unwrap());
    }

    #[test]
    fn chunked_bodies() {
        let (out, done) = decode(
            BodyKind::Chunked,
            b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: y\r\n\r\n",
        )
        .unwrap();
        assert_eq!(out, b"hello!");
        assert!(done);
        let (out, done) = decode(BodyKind::Chunked, b"a\r\n01234").unwrap();
        assert_eq!(out, b"01234");
        assert!(!done);
        assert!(decode(BodyKind::Chunked, b"zz\r\n").is_err());
        assert!(decode(BodyKind::Chunked, b"3\r\nabcX").is_err());
        assert!(decode(BodyKind::Chunked, b"ffffffffffffffffff\r\n").is_err());
        assert!(decode(BodyKind::Chunked, &[b'1'; 5000]).is_err());
    }

    #[test]
    fn length_bodies() {
        let (out, done) = decode(BodyKind::Length(3), b"abcdef").unwrap();
        assert_eq!(out, b"abc");
        assert!(done);
        let (_, done) = decode(BodyKind::Length(0), b"").unwrap();
        assert!(done);
    }

    /// Feeds `input` in pieces cut at `cuts`, as socket reads would deliver it.
    fn decode_split(kind: BodyKind, input: &[u8], cuts: &[usize]) -> io::Result<(Vec<u8>, bool)> {
        let mut body = Body::new(kind);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&input[at..p]);
            at = p;
            loop {
                match body.step(&mut buf)? {
                    Step::Piece(b) => out.extend_from_slice(&b),
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    proptest::proptest! {
        #[test]
        fn chunked_decoding_does_not_depend_on_read_boundaries(
            pieces in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..40), 0..8),
            cuts in proptest::collection::vec(0usize..1000, 0..10),
        ) {
            let mut wire = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                let ext = if i % 2 == 0 { "" } else { ";x=y" };
                wire.extend_from_slice(format!("{:X}{ext}\r\n", p.len()).as_bytes());
                wire.extend_from_slice(p);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\nTrailer: t\r\n\r\n");
            let expected: Vec<u8> = pieces.concat();
            let (out, done) = decode_split(BodyKind::Chunked, &wire, &cuts).unwrap();
            proptest::prop_assert!(done);
            proptest::prop_assert_eq!(out, expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cuts in proptest::collection::vec(0usize..600, 0..6),
        ) {
            let _ = decode_split(BodyKind::Chunked, &input, &cuts);
            let _ = decode_split(BodyKind::Length(300), &input, &cuts);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = req.parse(&input) {
                let _ = build_head(&req);
            }
        }
    }

    #[test]
    fn error_response_shape() {
        let r = error_response(404, &[], "Stream not found", false);
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(s.ends_with("\r\n\r\nStream not found\n"));
        assert!(s.contains("Content-Length: 17\r\n"));
    }
}
