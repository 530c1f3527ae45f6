//! Header names of the trickle protocol, shared by the server and the clients.

/// The segment a response is about (or a POST published).
pub const SEQ: &str = "Lp-Trickle-Seq";
/// The next sequence number the publisher will write (the live edge).
pub const LATEST: &str = "Lp-Trickle-Latest";
/// Present (`terminated`) on a GET whose segment closed empty because the channel is gone.
pub const CLOSED: &str = "Lp-Trickle-Closed";
/// `1` on a publisher's first POST after a restart: closes every older segment of the channel.
pub const RESET: &str = "Lp-Trickle-Reset";
/// On channel creation, the MIME type of the channel.
pub const EXPECT_CONTENT: &str = "Expect-Content";
/// Status code for "channel exists, segment does not" (not in the IANA registry).
pub const STATUS_SEGMENT_GONE: u16 = 470;
