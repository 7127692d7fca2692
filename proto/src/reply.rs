//! Replies from a backend: `+OK <text>` or `-ERR [CODE] <text>`, and the
//! values some of them carry, as types with `encode` (the backend's side) and
//! `parse` (the client's side), so that the two cannot drift apart:
//!
//! ```text
//! +OK PPL/1 <backend-name> <nonce>            Greeting (first line)
//! +OK <msgid> <size_bytes> <links_created>    PutReceipt
//! +OK <size_bytes>, then the bytes            BodyHeader (GET, GETM)
//! +OK <count> [more], lines, "."              BlockHeader + ListEntry / ListPage (LIST)
//! +OK <count>, mailbox lines, "."             BlockHeader + DirPage (DIR)
//! +OK <messages> <bytes>                      Usage
//! +OK <removed>                               Removed (DELM, NUKE)
//! +OK name=... mode=... ...                   Status
//! ```
//!
//! The bracketed code is the contract (frontends branch on it, operators grep
//! for it); the text is for people. Codes are modelled on RFC 2449 response
//! codes. Every parser is bounded ([`REPLY_LINE_MAX_BYTES`], a caller's line
//! limit for blocks) and refuses what it does not understand with a
//! [`ReplyError`], never a panic.

use std::fmt;

use crate::names::{MailboxName, MessageId};

/// The machine-readable reason in a `-ERR [CODE]` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not authenticated, or the proof was wrong.
    Auth,
    /// A syntax error or a command not valid in this state.
    Proto,
    /// A mailbox name or message id failed validation.
    BadName,
    /// No such message or mailbox.
    NotFound,
    /// The backend is read-only: PUT refused, everything else still works.
    ReadOnly,
    /// A message over the configured size limit.
    TooBig,
    /// Some other configured limit was hit (connections, recipients, ...).
    Limit,
    /// A temporary failure (I/O error, disk full); retry elsewhere or later.
    Temp,
    /// The client aborted the PUT it was sending.
    Aborted,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Auth => "AUTH",
            ErrorCode::Proto => "PROTO",
            ErrorCode::BadName => "BADNAME",
            ErrorCode::NotFound => "NOTFOUND",
            ErrorCode::ReadOnly => "READONLY",
            ErrorCode::TooBig => "TOOBIG",
            ErrorCode::Limit => "LIMIT",
            ErrorCode::Temp => "TEMP",
            ErrorCode::Aborted => "ABORTED",
        }
    }

    /// Parses a wire code; unknown codes are `None` (a newer backend).
    pub fn parse(s: &str) -> Option<ErrorCode> {
        Some(match s {
            "AUTH" => ErrorCode::Auth,
            "PROTO" => ErrorCode::Proto,
            "BADNAME" => ErrorCode::BadName,
            "NOTFOUND" => ErrorCode::NotFound,
            "READONLY" => ErrorCode::ReadOnly,
            "TOOBIG" => ErrorCode::TooBig,
            "LIMIT" => ErrorCode::Limit,
            "TEMP" => ErrorCode::Temp,
            "ABORTED" => ErrorCode::Aborted,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reply line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK <text>`.
    Ok(String),
    /// `-ERR [CODE] <text>`; `code` is `None` for a code this build does not know.
    Err(Option<ErrorCode>, String),
}

impl Reply {
    /// Parses one reply line (without its line ending). `None` if it is
    /// neither `+OK` nor `-ERR`.
    pub fn parse(line: &str) -> Option<Reply> {
        // Only ASCII white space separates, as in every typed reply's words
        // (a vertical tab is not one: trimming it would change a value).
        let trim = |s: &str| {
            s.trim_start_matches(|c: char| c.is_ascii_whitespace())
                .to_string()
        };
        if let Some(rest) = line.strip_prefix("+OK") {
            return Some(Reply::Ok(trim(rest)));
        }
        let rest = trim(line.strip_prefix("-ERR")?);
        if let Some(inner) = rest.strip_prefix('[') {
            if let Some(end) = inner.find(']') {
                let code = ErrorCode::parse(&inner[..end]);
                return Some(Reply::Err(code, trim(&inner[end + 1..])));
            }
        }
        Some(Reply::Err(None, rest))
    }
}

/// Formats an error reply line, CRLF included.
pub fn err_line(code: ErrorCode, text: &str) -> String {
    Reply::err(code, text).encode()
}

/// Formats a success reply line, CRLF included.
pub fn ok_line(text: &str) -> String {
    Reply::ok(text).encode()
}

/// Longest reply line a client accepts, in bytes (its line ending excluded).
pub const REPLY_LINE_MAX_BYTES: usize = 4096;

/// The line that ends a multi-line block (`LIST`, `DIR`), without its CRLF.
pub const BLOCK_END: &str = ".";

/// The word after the count in a `LIST` reply when more messages follow.
pub const LIST_MORE: &str = "more";

/// The text of `+OK` to a good `AUTH`.
pub const AUTHENTICATED: &str = "authenticated";

/// The text of `+OK` to `QUIT`.
pub const BYE: &str = "bye";

/// The text of `+OK` to `PING`.
pub const PONG: &str = "PONG";

/// The text of `+OK` to a `DEL` that removed the message.
pub const DELETED: &str = "deleted";

/// Optional features a backend announces in `STATUS` (revision 2).
pub const FEATURES: &str = "delm,getm";

/// Most `key=value` pairs a client keeps from one `STATUS` line.
pub const STATUS_PAIRS_MAX: usize = 64;

/// Why a reply could not be read as the one expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line over [`REPLY_LINE_MAX_BYTES`].
    #[error("reply line too long")]
    TooLong,
    /// Neither `+OK` nor `-ERR`.
    #[error("unexpected reply {0:?}")]
    NotAReply(String),
    /// The backend answered `-ERR` (a refusal, not a protocol error).
    #[error("backend refused [{}]: {text}", code.map(|c| c.as_str()).unwrap_or("?"))]
    Refused {
        /// The reply code, if known to this build.
        code: Option<ErrorCode>,
        /// The human text.
        text: String,
    },
    /// `+OK` with a text that is not what this reply carries.
    #[error("bad {what} reply {text:?}")]
    Malformed {
        /// Which reply was expected (`PUT`, `USAGE`, ...).
        what: &'static str,
        /// The text after `+OK`, or the whole line of a block.
        text: String,
    },
}

impl Reply {
    /// A success reply.
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply::Ok(text.into())
    }

    /// A refusal with its code.
    pub fn err(code: ErrorCode, text: impl Into<String>) -> Reply {
        Reply::Err(Some(code), text.into())
    }

    /// The line as sent, CRLF included. A refusal whose code this build does
    /// not know is written without a code (only a relay would do that).
    pub fn encode(&self) -> String {
        match self {
            Reply::Ok(text) if text.is_empty() => "+OK\r\n".to_string(),
            Reply::Ok(text) => format!("+OK {text}\r\n"),
            Reply::Err(Some(code), text) => format!("-ERR [{code}] {text}\r\n"),
            // `[?]` keeps a text that itself starts with a bracket from
            // being read back as a code.
            Reply::Err(None, text) => format!("-ERR [?] {text}\r\n"),
        }
    }

    /// Reads one line (without its line ending) as the `+OK` of `T`: a
    /// refusal becomes [`ReplyError::Refused`].
    pub fn expect<T: OkReply>(line: &str) -> Result<T, ReplyError> {
        if line.len() > REPLY_LINE_MAX_BYTES {
            return Err(ReplyError::TooLong);
        }
        match Reply::parse(line) {
            Some(Reply::Ok(text)) => T::parse_text(&text).ok_or(ReplyError::Malformed {
                what: T::WHAT,
                text,
            }),
            Some(Reply::Err(code, text)) => Err(ReplyError::Refused { code, text }),
            None => Err(ReplyError::NotAReply(line.to_string())),
        }
    }
}

/// A `+OK` reply that carries values: written by the backend with
/// [`encode`](OkReply::encode), read by the client with [`Reply::expect`].
/// Words after the ones a reply defines are ignored, so a later revision may
/// add some.
pub trait OkReply: Sized {
    /// The request it answers, for error messages.
    const WHAT: &'static str;
    /// The text after `+OK `.
    fn text(&self) -> String;
    /// Reads the text after `+OK`; `None` if it is not this reply.
    fn parse_text(text: &str) -> Option<Self>;
    /// The whole line, CRLF included.
    fn encode(&self) -> String {
        Reply::Ok(self.text()).encode()
    }
}

fn words<const N: usize>(text: &str) -> Option<[&str; N]> {
    let mut it = text.split_ascii_whitespace();
    let mut out = [""; N];
    for slot in &mut out {
        *slot = it.next()?;
    }
    Some(out)
}

/// The first line of a connection: `+OK PPL/1 <backend-name> <nonce>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The backend's configured name (one word).
    pub backend_name: String,
    /// The fresh per-connection nonce the `AUTH` proof covers.
    pub nonce: String,
}

impl OkReply for Greeting {
    const WHAT: &'static str = "greeting";
    fn text(&self) -> String {
        debug_assert!(!self
            .backend_name
            .contains(|c: char| c.is_ascii_whitespace()));
        format!("{} {} {}", crate::VERSION, self.backend_name, self.nonce)
    }
    /// `None` also for a protocol version this build does not speak.
    fn parse_text(text: &str) -> Option<Greeting> {
        let [version, name, nonce] = words(text)?;
        (version == crate::VERSION).then(|| Greeting {
            backend_name: name.to_string(),
            nonce: nonce.to_string(),
        })
    }
}

/// `+OK <msgid> <size_bytes> <links_created>`: a PUT is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutReceipt {
    /// The id stored.
    pub msgid: MessageId,
    /// Body size stored, in bytes.
    pub size_bytes: u64,
    /// New links made (mailboxes that already held the id are not counted).
    pub links_created: u64,
}

impl OkReply for PutReceipt {
    const WHAT: &'static str = "PUT";
    fn text(&self) -> String {
        format!("{} {} {}", self.msgid, self.size_bytes, self.links_created)
    }
    fn parse_text(text: &str) -> Option<PutReceipt> {
        let [msgid, size, links] = words(text)?;
        Some(PutReceipt {
            msgid: MessageId::parse(msgid).ok()?,
            size_bytes: size.parse().ok()?,
            links_created: links.parse().ok()?,
        })
    }
}

/// `+OK <size_bytes>`: exactly that many body bytes follow (`GET`, and each
/// found message of `GETM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyHeader {
    /// Bytes of the body that follows the line.
    pub size_bytes: u64,
}

impl OkReply for BodyHeader {
    const WHAT: &'static str = "GET";
    fn text(&self) -> String {
        self.size_bytes.to_string()
    }
    fn parse_text(text: &str) -> Option<BodyHeader> {
        let [size] = words(text)?;
        Some(BodyHeader {
            size_bytes: size.parse().ok()?,
        })
    }
}

/// `+OK <count>`: how many were removed (`DELM` messages, `NUKE` messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Messages removed.
    pub count: u64,
}

impl OkReply for Removed {
    const WHAT: &'static str = "DELM/NUKE";
    fn text(&self) -> String {
        self.count.to_string()
    }
    fn parse_text(text: &str) -> Option<Removed> {
        let [count] = words(text)?;
        Some(Removed {
            count: count.parse().ok()?,
        })
    }
}

/// `+OK <messages> <bytes> [g=<generation>]`: a mailbox's usage on one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Messages held.
    pub messages: u64,
    /// Their bytes.
    pub size_bytes: u64,
    /// The mailbox's generation on this backend (`g=`), when the backend
    /// sends one: a number that changes whenever the mailbox's content there
    /// may have changed, and never comes back (a random start per process,
    /// then counting up, so a restart or an index eviction gives new ones).
    /// `0` is a mailbox with no directory on the backend, so empty. A reader
    /// that saw generation `g` with a listing and sees `g` again knows the
    /// listing still holds; a different number only says "list again".
    pub generation: Option<u64>,
}

/// Prefix of the generation field in `USAGE` and `LIST` replies.
const GENERATION_PREFIX: &str = "g=";

fn generation_text(generation: Option<u64>) -> String {
    generation.map_or_else(String::new, |g| format!(" {GENERATION_PREFIX}{g}"))
}

fn parse_generation(word: &str) -> Option<u64> {
    word.strip_prefix(GENERATION_PREFIX)?.parse().ok()
}

impl OkReply for Usage {
    const WHAT: &'static str = "USAGE";
    fn text(&self) -> String {
        format!(
            "{} {}{}",
            self.messages,
            self.size_bytes,
            generation_text(self.generation)
        )
    }
    fn parse_text(text: &str) -> Option<Usage> {
        let mut w = text.split_ascii_whitespace();
        let messages = w.next()?.parse().ok()?;
        let size_bytes = w.next()?.parse().ok()?;
        let generation = match w.next() {
            None => None,
            Some(g) => Some(parse_generation(g)?),
        };
        if w.next().is_some() {
            return None;
        }
        Some(Usage {
            messages,
            size_bytes,
            generation,
        })
    }
}

/// The first line of a block: `+OK <count>` (`DIR`) or `+OK <count> [more]`
/// (`LIST`), then `count` lines, then [`BLOCK_END`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Lines that follow before the end line.
    pub count: u64,
    /// `LIST` only: more entries follow on a next page.
    pub more: bool,
    /// `LIST` only: the mailbox's generation ([`Usage::generation`]) this
    /// page was read at, when the backend sends one.
    pub generation: Option<u64>,
}

impl OkReply for BlockHeader {
    const WHAT: &'static str = "LIST/DIR";
    fn text(&self) -> String {
        let more = if self.more {
            format!(" {LIST_MORE}")
        } else {
            String::new()
        };
        format!("{}{more}{}", self.count, generation_text(self.generation))
    }
    fn parse_text(text: &str) -> Option<BlockHeader> {
        let mut w = text.split_ascii_whitespace();
        let count = w.next()?.parse().ok()?;
        let (mut more, mut generation) = (false, None);
        for word in w {
            if word == LIST_MORE && !more && generation.is_none() {
                more = true;
            } else if generation.is_none() {
                generation = Some(parse_generation(word)?);
            } else {
                return None;
            }
        }
        Some(BlockHeader {
            count,
            more,
            generation,
        })
    }
}

/// One line of a `LIST` block: `<msgid> <size_bytes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// The message id.
    pub msgid: MessageId,
    /// Its size in bytes.
    pub size_bytes: u64,
}

impl ListEntry {
    /// The line, CRLF included.
    pub fn encode(&self) -> String {
        let mut line = Vec::with_capacity(self.msgid.as_str().len() + 24);
        ListEntry::write_line(&self.msgid, self.size_bytes, &mut line);
        String::from_utf8(line).expect("ids and digits are ASCII")
    }

    /// Appends the line of `msgid` and `size_bytes` to `out`, CRLF included,
    /// without allocating (a server writing a 50,000-entry page).
    pub fn write_line(msgid: &MessageId, size_bytes: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(msgid.as_str().as_bytes());
        out.push(b' ');
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = size_bytes;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[at..]);
        out.extend_from_slice(b"\r\n");
    }

    /// Reads a line (without its line ending); exactly two words.
    pub fn parse(line: &str) -> Result<ListEntry, ReplyError> {
        let mut w = line.split(' ');
        let id = w.next().and_then(|s| MessageId::parse(s).ok());
        let size = w.next().and_then(|s| s.parse::<u64>().ok());
        match (id, size, w.next()) {
            (Some(msgid), Some(size_bytes), None) => Ok(ListEntry { msgid, size_bytes }),
            _ => Err(ReplyError::Malformed {
                what: "LIST line",
                text: line.to_string(),
            }),
        }
    }
}

/// One page of a mailbox listing: the whole `LIST` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The entries, sorted by id.
    pub entries: Vec<ListEntry>,
    /// More follow: ask again after the last id.
    pub more: bool,
    /// The mailbox's generation ([`Usage::generation`]) the page was read at.
    pub generation: Option<u64>,
}

impl ListPage {
    /// The whole block around `lines`, entry lines already written with
    /// [`ListEntry::write_line`] (`count` of them): header, lines, end line.
    pub fn encode_lines(count: u64, more: bool, generation: Option<u64>, lines: &[u8]) -> Vec<u8> {
        let header = BlockHeader {
            count,
            more,
            generation,
        }
        .encode();
        let mut block = Vec::with_capacity(header.len() + lines.len() + 3);
        block.extend_from_slice(header.as_bytes());
        block.extend_from_slice(lines);
        block.extend_from_slice(BLOCK_END.as_bytes());
        block.extend_from_slice(b"\r\n");
        block
    }

    /// The whole block: header, entry lines, end line.
    pub fn encode(&self) -> String {
        let mut s = BlockHeader {
            count: self.entries.len() as u64,
            more: self.more,
            generation: self.generation,
        }
        .encode();
        for e in &self.entries {
            s.push_str(&e.encode());
        }
        s.push_str(BLOCK_END);
        s.push_str("\r\n");
        s
    }

    /// Reads a whole block (CRLF or LF line ends) of at most `lines_max`
    /// entries; its count must match its lines.
    pub fn parse(block: &str, lines_max: usize) -> Result<ListPage, ReplyError> {
        let (header, lines) = parse_block(block, lines_max)?;
        let entries = lines
            .into_iter()
            .map(ListEntry::parse)
            .collect::<Result<_, _>>()?;
        Ok(ListPage {
            entries,
            more: header.more,
            generation: header.generation,
        })
    }
}

/// One page of a backend's mailboxes: the whole `DIR` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPage {
    /// The mailboxes, in name order.
    pub mailboxes: Vec<MailboxName>,
}

impl DirPage {
    /// The whole block: header, one mailbox per line, end line.
    pub fn encode(&self) -> String {
        let mut s = BlockHeader {
            count: self.mailboxes.len() as u64,
            more: false,
            generation: None,
        }
        .encode();
        for m in &self.mailboxes {
            s.push_str(m.as_str());
            s.push_str("\r\n");
        }
        s.push_str(BLOCK_END);
        s.push_str("\r\n");
        s
    }

    /// Reads one mailbox line of a `DIR` block.
    pub fn parse_line(line: &str) -> Result<MailboxName, ReplyError> {
        MailboxName::parse(line).map_err(|_| ReplyError::Malformed {
            what: "DIR line",
            text: line.to_string(),
        })
    }

    /// Reads a whole block of at most `lines_max` mailboxes.
    pub fn parse(block: &str, lines_max: usize) -> Result<DirPage, ReplyError> {
        let (_, lines) = parse_block(block, lines_max)?;
        let mailboxes = lines
            .into_iter()
            .map(DirPage::parse_line)
            .collect::<Result<_, _>>()?;
        Ok(DirPage { mailboxes })
    }
}

/// Splits a whole block into its header and its lines, checking the count,
/// the end line, and that nothing follows it.
fn parse_block(block: &str, lines_max: usize) -> Result<(BlockHeader, Vec<&str>), ReplyError> {
    let mut it = block
        .split_inclusive('\n')
        .map(|l| l.strip_suffix('\n').unwrap_or(l))
        .map(|l| l.strip_suffix('\r').unwrap_or(l));
    let malformed = || ReplyError::Malformed {
        what: "block",
        text: block.chars().take(80).collect(),
    };
    let header: BlockHeader = Reply::expect(it.next().ok_or_else(malformed)?)?;
    let mut lines = Vec::new();
    loop {
        let line = it.next().ok_or_else(malformed)?;
        if line == BLOCK_END {
            break;
        }
        if lines.len() >= lines_max || line.len() > REPLY_LINE_MAX_BYTES {
            return Err(malformed());
        }
        lines.push(line);
    }
    if it.next().is_some() || header.count != lines.len() as u64 {
        return Err(malformed());
    }
    Ok((header, lines))
}

/// `+OK name=<n> mode=<m> free_bytes=<n> ...`: a backend's `STATUS`, as
/// `key=value` pairs in the order sent (unknown keys kept, for newer backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The pairs; keys and values have no space or `=` in a key.
    pub pairs: Vec<(String, String)>,
}

impl Status {
    /// The status pplistener sends: its name, mode, disk space, open
    /// connections and PUTs served, then the version and [`FEATURES`].
    pub fn of_backend(
        name: &str,
        mode: &str,
        free_bytes: u64,
        total_bytes: u64,
        connections: u64,
        puts: u64,
    ) -> Status {
        let pairs = [
            ("name", name.to_string()),
            ("mode", mode.to_string()),
            ("free_bytes", free_bytes.to_string()),
            ("total_bytes", total_bytes.to_string()),
            ("connections", connections.to_string()),
            ("puts", puts.to_string()),
            ("version", crate::VERSION.to_string()),
            ("features", FEATURES.to_string()),
        ];
        Status {
            pairs: pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    /// The value of `key`, if sent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl OkReply for Status {
    const WHAT: &'static str = "STATUS";
    fn text(&self) -> String {
        let pairs: Vec<String> = self.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(" ")
    }
    /// Words without `=` are skipped; at most [`STATUS_PAIRS_MAX`] pairs.
    fn parse_text(text: &str) -> Option<Status> {
        let pairs = text
            .split_ascii_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .take(STATUS_PAIRS_MAX)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Status { pairs })
    }
}

/// The property the `replies` fuzz target checks, public so that a unit
/// test runs it too: whatever `line` is, reading it as any reply never
/// panics, and what reads back encodes to a line that reads back the same.
/// Panics (the fuzz failure) when that does not hold.
#[doc(hidden)]
pub fn check_round_trip(line: &str) {
    fn typed<T: OkReply + PartialEq + fmt::Debug>(line: &str) {
        if let Ok(value) = Reply::expect::<T>(line) {
            let again = value.encode();
            let bare = again.strip_suffix("\r\n").expect("encode ends in CRLF");
            // `+OKx` gains a space: at the very limit that is one too many.
            if bare.len() <= REPLY_LINE_MAX_BYTES {
                assert_eq!(Reply::expect::<T>(bare).as_ref(), Ok(&value), "{line:?}");
            }
        }
    }
    if let Some(reply) = Reply::parse(line) {
        let again = reply.encode();
        let bare = again.strip_suffix("\r\n").expect("encode ends in CRLF");
        assert_eq!(Reply::parse(bare).as_ref(), Some(&reply), "{line:?}");
    }
    typed::<Greeting>(line);
    typed::<PutReceipt>(line);
    typed::<BodyHeader>(line);
    typed::<Removed>(line);
    typed::<Usage>(line);
    typed::<BlockHeader>(line);
    typed::<Status>(line);
    if let Ok(entry) = ListEntry::parse(line) {
        let again = entry.encode();
        assert_eq!(ListEntry::parse(again.trim_end_matches("\r\n")), Ok(entry));
    }
    // The same text as a whole block (lines split at LF), both kinds.
    if let Ok(page) = ListPage::parse(line, 16) {
        assert_eq!(ListPage::parse(&page.encode(), 16), Ok(page));
    }
    if let Ok(page) = DirPage::parse(line, 16) {
        assert_eq!(DirPage::parse(&page.encode(), 16), Ok(page));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MessageId {
        MessageId::parse(s).unwrap()
    }

    /// `encode` then `expect` gives the value back, and the line is one
    /// CRLF-terminated line.
    fn round_trip<T: OkReply + PartialEq + std::fmt::Debug>(value: T) {
        let line = value.encode();
        let bare = line.strip_suffix("\r\n").expect("CRLF");
        assert!(!bare.contains(['\r', '\n']), "{line:?}");
        assert_eq!(Reply::expect::<T>(bare), Ok(value));
    }

    #[test]
    fn list_lines_written_in_place_are_the_encoded_page() {
        let entries = vec![
            ListEntry {
                msgid: MessageId::parse("0001.a.1").unwrap(),
                size_bytes: 0,
            },
            ListEntry {
                msgid: MessageId::parse("0002.b-c_d.2").unwrap(),
                size_bytes: u64::MAX,
            },
            ListEntry {
                msgid: MessageId::parse("x").unwrap(),
                size_bytes: 4096,
            },
        ];
        let mut lines = Vec::new();
        for e in &entries {
            ListEntry::write_line(&e.msgid, e.size_bytes, &mut lines);
        }
        for more in [false, true] {
            for generation in [None, Some(0), Some(u64::MAX)] {
                let page = ListPage {
                    entries: entries.clone(),
                    more,
                    generation,
                };
                let block = ListPage::encode_lines(3, more, generation, &lines);
                assert_eq!(String::from_utf8(block).unwrap(), page.encode());
            }
        }
        assert_eq!(entries[1].encode(), "0002.b-c_d.2 18446744073709551615\r\n");
    }

    #[test]
    fn replies_round_trip() {
        assert_eq!(Reply::parse("+OK 3 12"), Some(Reply::Ok("3 12".into())));
        assert_eq!(Reply::parse("+OK"), Some(Reply::Ok(String::new())));
        let l = err_line(ErrorCode::ReadOnly, "backend is read-only");
        assert_eq!(l, "-ERR [READONLY] backend is read-only\r\n");
        assert_eq!(
            Reply::parse(l.trim_end()),
            Some(Reply::Err(
                Some(ErrorCode::ReadOnly),
                "backend is read-only".into()
            ))
        );
        assert_eq!(
            Reply::parse("-ERR [NEWCODE] x"),
            Some(Reply::Err(None, "x".into()))
        );
        assert_eq!(Reply::parse("hello"), None);
        assert_eq!(ok_line(""), "+OK\r\n");
        assert_eq!(ok_line(PONG), "+OK PONG\r\n");
    }

    #[test]
    fn every_code_round_trips() {
        use ErrorCode::*;
        for code in [
            Auth, Proto, BadName, NotFound, ReadOnly, TooBig, Limit, Temp, Aborted,
        ] {
            let line = Reply::err(code, "why").encode();
            let bare = line.trim_end();
            assert_eq!(Reply::parse(bare), Some(Reply::err(code, "why")));
            assert_eq!(
                Reply::expect::<Usage>(bare),
                Err(ReplyError::Refused {
                    code: Some(code),
                    text: "why".into()
                })
            );
        }
        // An unknown code survives a relay without turning into a known one.
        let unknown = Reply::parse("-ERR [NEW] [AUTH] text").unwrap();
        assert_eq!(Reply::parse(unknown.encode().trim_end()), Some(unknown));
    }

    #[test]
    fn typed_replies_round_trip() {
        round_trip(Greeting {
            backend_name: "b1".into(),
            nonce: "00ff".repeat(8),
        });
        round_trip(PutReceipt {
            msgid: id("0005f1.fe1.2a"),
            size_bytes: 1234,
            links_created: 3,
        });
        round_trip(BodyHeader { size_bytes: 0 });
        round_trip(BodyHeader {
            size_bytes: u64::MAX,
        });
        round_trip(Removed { count: 7 });
        for generation in [None, Some(0), Some(7), Some(u64::MAX)] {
            round_trip(Usage {
                messages: 2,
                size_bytes: 99,
                generation,
            });
            for (count, more) in [(100_000, true), (0, false)] {
                round_trip(BlockHeader {
                    count,
                    more,
                    generation,
                });
            }
        }
        round_trip(Status::of_backend("b1", "ro-auto", 1, 2, 3, 4));
    }

    #[test]
    fn wire_forms_are_the_documented_ones() {
        let g = Greeting {
            backend_name: "b1".into(),
            nonce: "abc".into(),
        };
        assert_eq!(g.encode(), "+OK PPL/1 b1 abc\r\n");
        let r = PutReceipt {
            msgid: id("m.1"),
            size_bytes: 5,
            links_created: 2,
        };
        assert_eq!(r.encode(), "+OK m.1 5 2\r\n");
        assert_eq!(BodyHeader { size_bytes: 42 }.encode(), "+OK 42\r\n");
        let s = Status::of_backend("b1", "rw", 10, 20, 1, 0);
        assert_eq!(
            s.encode(),
            "+OK name=b1 mode=rw free_bytes=10 total_bytes=20 connections=1 puts=0 \
             version=PPL/1 features=delm,getm\r\n"
        );
        assert_eq!(s.get("mode"), Some("rw"));
        let page = ListPage {
            entries: vec![ListEntry {
                msgid: id("a"),
                size_bytes: 1,
            }],
            more: true,
            generation: None,
        };
        assert_eq!(page.encode(), "+OK 1 more\r\na 1\r\n.\r\n");
        let empty = ListPage {
            entries: vec![],
            more: false,
            generation: Some(0),
        };
        assert_eq!(empty.encode(), "+OK 0 g=0\r\n.\r\n");
        let usage = Usage {
            messages: 3,
            size_bytes: 12,
            generation: Some(41),
        };
        assert_eq!(usage.encode(), "+OK 3 12 g=41\r\n");
        // What a backend without generations sends still reads.
        assert_eq!(
            Reply::expect::<Usage>("+OK 3 12"),
            Ok(Usage {
                messages: 3,
                size_bytes: 12,
                generation: None
            })
        );
        for bad in ["+OK 3 12 41", "+OK 3 12 g=x", "+OK 3 12 g=1 g=2"] {
            assert!(Reply::expect::<Usage>(bad).is_err(), "{bad}");
        }
        for bad in [
            "+OK 3 g=1 more",
            "+OK 3 more more",
            "+OK 3 g=1 g=2",
            "+OK 3 x",
        ] {
            assert!(Reply::expect::<BlockHeader>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blocks_round_trip() {
        let page = ListPage {
            entries: (0..5)
                .map(|i| ListEntry {
                    msgid: id(&format!("m{i}")),
                    size_bytes: i * 10,
                })
                .collect(),
            more: true,
            generation: Some(12),
        };
        assert_eq!(ListPage::parse(&page.encode(), 5), Ok(page.clone()));
        assert!(
            ListPage::parse(&page.encode(), 4).is_err(),
            "over the limit"
        );
        let dir = DirPage {
            mailboxes: ["a@x.org", "b@x.org"]
                .iter()
                .map(|m| MailboxName::parse(m).unwrap())
                .collect(),
        };
        assert_eq!(DirPage::parse(&dir.encode(), 10), Ok(dir.clone()));
        let empty = DirPage { mailboxes: vec![] };
        assert_eq!(DirPage::parse(&empty.encode(), 0), Ok(empty));
    }

    #[test]
    fn the_fuzz_property_holds_on_the_seeds() {
        for line in [
            "+OK PPL/1 b1 n0nce",
            "+OK m.1 5 2",
            "+OK +5",
            "+OK  7 more x",
            "+OK name=b1 mode=rw a==b =c",
            "-ERR [NEW] [AUTH] text",
            "-ERR [AUTH]",
            "-ERR [AUTH x",
            "+OKx",
            "+OK 1\r\nm 1\r\n.\r\n",
            "+OK 1\na@b.org\n.",
            "a 1",
            "\u{a0} \u{0}",
            // Found by the fuzzer: a vertical tab trimmed from a STATUS key.
            "+OK 1\r\na 1\r\n.\r\u{b}=\0x",
            "+OK\u{b}=v",
        ] {
            check_round_trip(line);
        }
    }

    #[test]
    fn hostile_replies_are_refused_not_panicked_on() {
        assert!(Reply::expect::<Greeting>("+OK PPL/2 b1 n").is_err());
        assert!(Reply::expect::<Greeting>("+OK PPL/1 b1").is_err());
        assert!(Reply::expect::<PutReceipt>("+OK ../x 1 1").is_err());
        assert!(Reply::expect::<PutReceipt>("+OK m 1 -1").is_err());
        assert!(Reply::expect::<BodyHeader>("+OK 18446744073709551616").is_err());
        assert!(Reply::expect::<Usage>("+OK 1").is_err());
        assert!(Reply::expect::<BlockHeader>("+OK").is_err());
        assert_eq!(
            Reply::expect::<Removed>(&format!("+OK {}", "1".repeat(5000))),
            Err(ReplyError::TooLong)
        );
        assert!(matches!(
            Reply::expect::<Removed>("250 ok"),
            Err(ReplyError::NotAReply(_))
        ));
        let many = "k=v ".repeat(1000);
        let status: Status = Reply::expect(&format!("+OK {many}")).unwrap();
        assert_eq!(status.pairs.len(), STATUS_PAIRS_MAX);
        // Count and lines disagree, no end line, junk after the end, bad lines.
        for block in [
            "+OK 2\r\na 1\r\n.\r\n",
            "+OK 1\r\na 1\r\n",
            "+OK 1\r\na 1\r\n.\r\nx\r\n",
            "+OK 1\r\na 1 2\r\n.\r\n",
            "+OK 1\r\n../a 1\r\n.\r\n",
            "-ERR [TEMP] disk\r\n",
            "",
        ] {
            assert!(ListPage::parse(block, 10).is_err(), "{block:?}");
        }
        assert!(DirPage::parse("+OK 1\r\n../x@y\r\n.\r\n", 10).is_err());
        // A bare LF is accepted as a line end.
        assert!(ListPage::parse("+OK 1\na 1\n.\n", 10).is_ok());
    }
}
