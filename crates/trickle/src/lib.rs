//! The trickle protocol: segmented publish/subscribe over HTTP/1.1 (plain or TLS).
//!
//! A *channel* is a named stream of *segments*; each segment is one HTTP body, streamed while it is
//! being written. This crate speaks the protocol byte for byte as go-livepeer's reference server and
//! the Python clients do (see `docs/trickle.md`):
//!
//! - [`server`]: the server, with the five-segment ring, preconnects, 470 live-edge jumps and the rest.
//! - [`publisher`]: writes segments to a channel, preconnecting the next one.
//! - [`subscriber`]: reads segments from a channel, following the live edge.
//! - [`jsonl`]: JSON-lines channels (control and events) on top of the two clients.
//! - [`messages`]: typed control and events messages.
//! - [`client_tls`]: how the clients treat an `https://` server's certificate (any, a pinned CA,
//!   or the system's roots); the server speaks TLS with [`server::ServerConfig::tls`].

pub mod client_tls;
pub mod headers;
pub mod jsonl;
pub mod messages;
pub mod publisher;
pub mod server;
pub mod subscriber;
