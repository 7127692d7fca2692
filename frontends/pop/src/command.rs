//! POP3 commands (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH): parsing one line
//! into a [`Command`]. Pure: no state, no I/O.

/// Longest argument accepted (a user name, a password), in bytes.
pub const ARG_MAX_BYTES: usize = 512;

/// One client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `USER name`.
    User(String),
    /// `PASS password` (the rest of the line: passwords may hold spaces).
    Pass(String),
    /// `APOP name digest` — recognised, not offered.
    Apop,
    /// `AUTH [mechanism [initial-response]]`.
    Auth {
        /// The mechanism, upper-cased; `None` for a bare `AUTH`.
        mechanism: Option<String>,
        /// The initial response (base64, `=` for empty).
        initial: Option<String>,
    },
    /// `CAPA`.
    Capa,
    /// `STLS` — recognised, not offered (yet).
    Stls,
    /// `QUIT`.
    Quit,
    /// `STAT`.
    Stat,
    /// `LIST [msg]`.
    List(Option<u64>),
    /// `RETR msg`.
    Retr(u64),
    /// `DELE msg`.
    Dele(u64),
    /// `NOOP`.
    Noop,
    /// `RSET`.
    Rset,
    /// `TOP msg lines`.
    Top(u64, u64),
    /// `UIDL [msg]`.
    Uidl(Option<u64>),
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// An unknown keyword.
    Unknown,
    /// A known keyword with missing, extra or malformed arguments.
    Syntax(&'static str),
}

fn number(s: &str) -> Result<u64, CommandError> {
    // RFC 1939 numbers are plain decimal; refuse signs and absurd lengths.
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CommandError::Syntax("argument must be a number"));
    }
    s.parse()
        .map_err(|_| CommandError::Syntax("number too large"))
}

fn one_arg<'a>(args: &[&'a str], what: &'static str) -> Result<&'a str, CommandError> {
    match args {
        [a] if a.len() <= ARG_MAX_BYTES => Ok(a),
        [_] => Err(CommandError::Syntax("argument too long")),
        _ => Err(CommandError::Syntax(what)),
    }
}

fn opt_number(args: &[&str]) -> Result<Option<u64>, CommandError> {
    match args {
        [] => Ok(None),
        [n] => number(n).map(Some),
        _ => Err(CommandError::Syntax("too many arguments")),
    }
}

impl Command {
    /// Parses one line (without CRLF). Keywords are case-insensitive.
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        let text = std::str::from_utf8(line).map_err(|_| CommandError::Syntax("not UTF-8"))?;
        let (keyword, rest) = match text.split_once(' ') {
            Some((k, r)) => (k, r),
            None => (text, ""),
        };
        let keyword = keyword.to_ascii_uppercase();
        let args: Vec<&str> = rest.split_ascii_whitespace().take(4).collect();
        let none = |c: Command| {
            if args.is_empty() {
                Ok(c)
            } else {
                Err(CommandError::Syntax("no arguments expected"))
            }
        };
        match keyword.as_str() {
            "USER" => Ok(Command::User(
                one_arg(&args, "USER needs one name")?.to_string(),
            )),
            "PASS" => {
                if rest.is_empty() {
                    Err(CommandError::Syntax("PASS needs a password"))
                } else if rest.len() > ARG_MAX_BYTES {
                    Err(CommandError::Syntax("argument too long"))
                } else {
                    Ok(Command::Pass(rest.to_string()))
                }
            }
            "APOP" => Ok(Command::Apop),
            "AUTH" => match args.as_slice() {
                [] => Ok(Command::Auth {
                    mechanism: None,
                    initial: None,
                }),
                [m] => Ok(Command::Auth {
                    mechanism: Some(m.to_ascii_uppercase()),
                    initial: None,
                }),
                [m, i] if i.len() <= 2 * ARG_MAX_BYTES => Ok(Command::Auth {
                    mechanism: Some(m.to_ascii_uppercase()),
                    initial: Some(i.to_string()),
                }),
                _ => Err(CommandError::Syntax("AUTH mechanism [initial-response]")),
            },
            "CAPA" => none(Command::Capa),
            "STLS" => none(Command::Stls),
            "QUIT" => none(Command::Quit),
            "STAT" => none(Command::Stat),
            "NOOP" => none(Command::Noop),
            "RSET" => none(Command::Rset),
            "LIST" => Ok(Command::List(opt_number(&args)?)),
            "UIDL" => Ok(Command::Uidl(opt_number(&args)?)),
            "RETR" => Ok(Command::Retr(number(one_arg(&args, "RETR msg")?)?)),
            "DELE" => Ok(Command::Dele(number(one_arg(&args, "DELE msg")?)?)),
            "TOP" => match args.as_slice() {
                [m, n] => Ok(Command::Top(number(m)?, number(n)?)),
                _ => Err(CommandError::Syntax("TOP msg lines")),
            },
            _ => Err(CommandError::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let p = |s: &str| Command::parse(s.as_bytes());
        assert_eq!(
            p("user Bob%example.org"),
            Ok(Command::User("Bob%example.org".into()))
        );
        assert_eq!(
            p("PASS with space "),
            Ok(Command::Pass("with space ".into()))
        );
        assert_eq!(p("stat"), Ok(Command::Stat));
        assert_eq!(p("LIST"), Ok(Command::List(None)));
        assert_eq!(p("LIST 3"), Ok(Command::List(Some(3))));
        assert_eq!(p("UIDL 12"), Ok(Command::Uidl(Some(12))));
        assert_eq!(p("RETR 1"), Ok(Command::Retr(1)));
        assert_eq!(p("DELE 2"), Ok(Command::Dele(2)));
        assert_eq!(p("TOP 1 0"), Ok(Command::Top(1, 0)));
        assert_eq!(p("NOOP"), Ok(Command::Noop));
        assert_eq!(p("RSET"), Ok(Command::Rset));
        assert_eq!(p("QUIT"), Ok(Command::Quit));
        assert_eq!(p("CAPA"), Ok(Command::Capa));
        assert_eq!(
            p("AUTH plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some("AGEAYg==".into())
            })
        );
    }

    #[test]
    fn refuses_malformed_commands() {
        let p = |s: &str| Command::parse(s.as_bytes());
        assert_eq!(p("HELO x"), Err(CommandError::Unknown));
        assert_eq!(p(""), Err(CommandError::Unknown));
        for bad in [
            "RETR",
            "RETR x",
            "RETR -1",
            "RETR 1 2",
            "TOP 1",
            "STAT 1",
            "USER",
            "PASS",
            "LIST 99999999999999999999",
            "USER a b",
        ] {
            assert!(matches!(p(bad), Err(CommandError::Syntax(_))), "{bad}");
        }
        assert!(Command::parse(b"USER \xff").is_err());
    }
}
