//! PPL/1, the backend protocol between PowerMail's frontends (powersmtp,
//! powerpop, ppadmin) and its message store (pplistener).
//!
//! Everything both sides must agree on lives here, in one place: what a valid
//! mailbox name and message id are ([`names`]), the requests ([`request`]),
//! the replies ([`reply`]), the authentication ([`auth`]), the zero-copy
//! body relay ([`splice`]), the server-side
//! incremental [`Decoder`], and the blocking client [`BackendConn`]. The
//! protocol itself is documented in `proto/PROTOCOL.md`.

pub mod auth;
pub mod client;
pub mod decoder;
pub mod names;
pub mod reply;
pub mod request;
pub mod splice;

pub use client::{BackendConn, BackendError};
pub use decoder::{Decoder, Event, Fatal, Limits};
pub use names::{MailboxName, MessageId, NameError};
pub use reply::{
    BlockHeader, BodyHeader, DirPage, ErrorCode, Greeting, ListEntry, ListPage, OkReply,
    PutReceipt, Removed, Reply, ReplyError, Status, Usage,
};
pub use request::{Request, RequestError, GET_MANY_MAX};
pub use splice::SpliceSink;

/// The protocol version, first word of every greeting.
pub const VERSION: &str = "PPL/1";
