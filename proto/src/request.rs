//! The requests of PPL/1 as types, shared by client and server so that the
//! two cannot drift apart: the client calls [`Request::encode`], the server's
//! [`Decoder`](crate::Decoder) produces the same values.
//!
//! Wire forms (one line each, CRLF; verbs case-insensitive):
//!
//! ```text
//! AUTH <proof>                 PUT <msgid> <mailbox-count>   (then the mailbox lines, then the body)
//! LIST <mailbox> [<after>]     GET <mailbox> <msgid>         DEL <mailbox> <msgid>
//! DELM <mailbox> <msgid>...    USAGE <mailbox>               NUKE <mailbox>
//! GETM <mailbox> <msgid>...
//! DIR [<after>]
//! STATUS                       READONLY                      READWRITE
//! PING                         QUIT
//! ```
//!
//! See `proto/PROTOCOL.md` for replies and the PUT body framing.

use crate::names::{MailboxName, MessageId, NameError};

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Prove knowledge of the shared secret (see [`crate::auth`]).
    Auth {
        /// Hex HMAC proof.
        proof: String,
    },
    /// Store one message, linked into every mailbox; the body follows in chunks.
    Put {
        /// The system-wide id.
        msgid: MessageId,
        /// All local recipients on this backend (at least one).
        mailboxes: Vec<MailboxName>,
    },
    /// List a mailbox: `<msgid> <size>` lines sorted by id, at most
    /// `list_max_entries` of them; the reply says when more follow.
    List {
        /// The mailbox.
        mailbox: MailboxName,
        /// Only messages whose id sorts after this one (the next page).
        after: Option<MessageId>,
    },
    /// Fetch one message's bytes.
    Get {
        /// The mailbox.
        mailbox: MailboxName,
        /// The message.
        msgid: MessageId,
    },
    /// Fetch several messages of one mailbox in one round trip: for each id
    /// in order `+OK <size>` and the bytes, or `-ERR [NOTFOUND] <id>`.
    GetMany {
        /// The mailbox.
        mailbox: MailboxName,
        /// The messages: 1 to [`GET_MANY_MAX`], as many as fit a command line.
        msgids: Vec<MessageId>,
    },
    /// Remove one message from one mailbox.
    Del {
        /// The mailbox.
        mailbox: MailboxName,
        /// The message.
        msgid: MessageId,
    },
    /// Remove several messages from one mailbox with one directory sync
    /// (a POP3 QUIT that deleted many). Ids not present are skipped.
    DelMany {
        /// The mailbox.
        mailbox: MailboxName,
        /// The messages: 1 to [`DEL_MANY_MAX`], as many as fit a command line.
        msgids: Vec<MessageId>,
    },
    /// Message count and bytes of a mailbox on this backend.
    Usage {
        /// The mailbox.
        mailbox: MailboxName,
    },
    /// Remove a whole mailbox from this backend.
    Nuke {
        /// The mailbox.
        mailbox: MailboxName,
    },
    /// List the mailboxes this backend holds, in name order: the first
    /// `list_max_entries` of them, or of those after `after` (the next page).
    Dir {
        /// Only mailboxes whose name sorts after this one.
        after: Option<MailboxName>,
    },
    /// Mode, free space and load.
    Status,
    /// Refuse PUTs from now on.
    ReadOnly,
    /// Accept PUTs again.
    ReadWrite,
    /// Liveness check.
    Ping,
    /// Close the connection.
    Quit,
}

/// Most message ids in one `DELM` (the command line's length limits it too).
pub const DEL_MANY_MAX: usize = 64;

/// Most message ids in one `GETM` (the command line's length limits it too).
pub const GET_MANY_MAX: usize = 64;

/// Why a command line was refused. The connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Unknown verb.
    #[error("unknown command")]
    UnknownVerb,
    /// Wrong number or form of arguments.
    #[error("syntax: {0}")]
    Syntax(&'static str),
    /// A mailbox or message id was refused.
    #[error("bad name: {0}")]
    BadName(#[from] NameError),
    /// More mailboxes in one PUT than the limit.
    #[error("too many mailboxes in one PUT")]
    TooManyMailboxes,
}

impl Request {
    /// The verb, upper-case (for logs and per-verb statistics).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Auth { .. } => "AUTH",
            Request::Put { .. } => "PUT",
            Request::List { .. } => "LIST",
            Request::Get { .. } => "GET",
            Request::GetMany { .. } => "GETM",
            Request::Del { .. } => "DEL",
            Request::DelMany { .. } => "DELM",
            Request::Usage { .. } => "USAGE",
            Request::Nuke { .. } => "NUKE",
            Request::Dir { .. } => "DIR",
            Request::Status => "STATUS",
            Request::ReadOnly => "READONLY",
            Request::ReadWrite => "READWRITE",
            Request::Ping => "PING",
            Request::Quit => "QUIT",
        }
    }

    /// The request's lines as sent by a client (the PUT header includes its
    /// mailbox lines; the body is framed separately).
    pub fn encode(&self) -> String {
        match self {
            Request::Auth { proof } => format!("AUTH {proof}\r\n"),
            Request::Put { msgid, mailboxes } => {
                let mut s = format!("PUT {msgid} {}\r\n", mailboxes.len());
                for m in mailboxes {
                    s.push_str(m.as_str());
                    s.push_str("\r\n");
                }
                s
            }
            Request::List {
                mailbox,
                after: None,
            } => format!("LIST {mailbox}\r\n"),
            Request::List {
                mailbox,
                after: Some(after),
            } => format!("LIST {mailbox} {after}\r\n"),
            Request::Get { mailbox, msgid } => format!("GET {mailbox} {msgid}\r\n"),
            Request::Del { mailbox, msgid } => format!("DEL {mailbox} {msgid}\r\n"),
            Request::DelMany { mailbox, msgids } | Request::GetMany { mailbox, msgids } => {
                let verb = if matches!(self, Request::GetMany { .. }) {
                    "GETM"
                } else {
                    "DELM"
                };
                let mut s = format!("{verb} {mailbox}");
                for id in msgids {
                    s.push(' ');
                    s.push_str(id.as_str());
                }
                s.push_str("\r\n");
                s
            }
            Request::Usage { mailbox } => format!("USAGE {mailbox}\r\n"),
            Request::Nuke { mailbox } => format!("NUKE {mailbox}\r\n"),
            Request::Dir { after: Some(after) } => format!("DIR {after}\r\n"),
            other => format!("{}\r\n", other.verb()),
        }
    }
}

/// A parsed command line. `PUT` is returned as a header: its mailbox lines
/// come next and are collected by the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Line {
    /// A complete request.
    Complete(Request),
    /// `PUT <msgid> <count>`: `count` mailbox lines follow.
    PutHeader(Result<MessageId, NameError>, usize),
}

/// Parses one command line (without line ending).
pub(crate) fn parse_line(line: &[u8], mailboxes_max: usize) -> Result<Line, RequestError> {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let verb = words.next().ok_or(RequestError::Syntax("empty line"))?;
    let args: Vec<&[u8]> = words.collect();
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(RequestError::Syntax("wrong number of arguments"))
        }
    };
    let mailbox = |i: usize| MailboxName::parse_bytes(args[i]).map_err(RequestError::from);
    let msgid = |i: usize| MessageId::parse_bytes(args[i]).map_err(RequestError::from);
    let verb = std::str::from_utf8(verb).map_err(|_| RequestError::UnknownVerb)?;
    let req = match verb.to_ascii_uppercase().as_str() {
        "AUTH" => {
            arity(1)?;
            let proof = std::str::from_utf8(args[0]).map_err(|_| RequestError::Syntax("proof"))?;
            Request::Auth {
                proof: proof.to_string(),
            }
        }
        "PUT" => {
            arity(2)?;
            let count = std::str::from_utf8(args[1])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or(RequestError::Syntax("mailbox count"))?;
            if count == 0 {
                return Err(RequestError::Syntax("mailbox count"));
            }
            if count > mailboxes_max {
                return Err(RequestError::TooManyMailboxes);
            }
            // A bad id still has its mailbox lines and body coming: the
            // decoder must consume them, so the error travels with the header.
            return Ok(Line::PutHeader(MessageId::parse_bytes(args[0]), count));
        }
        "LIST" => match args.len() {
            1 => Request::List {
                mailbox: mailbox(0)?,
                after: None,
            },
            2 => Request::List {
                mailbox: mailbox(0)?,
                after: Some(msgid(1)?),
            },
            _ => {
                return Err(RequestError::Syntax(
                    "LIST takes a mailbox and an optional id",
                ))
            }
        },
        "GET" => {
            arity(2)?;
            Request::Get {
                mailbox: mailbox(0)?,
                msgid: msgid(1)?,
            }
        }
        "DEL" => {
            arity(2)?;
            Request::Del {
                mailbox: mailbox(0)?,
                msgid: msgid(1)?,
            }
        }
        "DELM" => {
            if args.len() < 2 || args.len() > DEL_MANY_MAX + 1 {
                return Err(RequestError::Syntax("DELM takes 1 to 64 message ids"));
            }
            Request::DelMany {
                mailbox: mailbox(0)?,
                msgids: (1..args.len()).map(msgid).collect::<Result<_, _>>()?,
            }
        }
        "GETM" => {
            if args.len() < 2 || args.len() > GET_MANY_MAX + 1 {
                return Err(RequestError::Syntax("GETM takes 1 to 64 message ids"));
            }
            Request::GetMany {
                mailbox: mailbox(0)?,
                msgids: (1..args.len()).map(msgid).collect::<Result<_, _>>()?,
            }
        }
        "USAGE" => {
            arity(1)?;
            Request::Usage {
                mailbox: mailbox(0)?,
            }
        }
        "NUKE" => {
            arity(1)?;
            Request::Nuke {
                mailbox: mailbox(0)?,
            }
        }
        "DIR" => match args.len() {
            0 => Request::Dir { after: None },
            1 => Request::Dir {
                after: Some(mailbox(0)?),
            },
            _ => return Err(RequestError::Syntax("DIR takes at most one mailbox")),
        },
        "STATUS" => Request::Status,
        "READONLY" => Request::ReadOnly,
        "READWRITE" => Request::ReadWrite,
        "PING" => Request::Ping,
        "QUIT" => Request::Quit,
        _ => return Err(RequestError::UnknownVerb),
    };
    match req {
        Request::Status
        | Request::ReadOnly
        | Request::ReadWrite
        | Request::Ping
        | Request::Quit => arity(0)?,
        _ => {}
    }
    Ok(Line::Complete(req))
}
