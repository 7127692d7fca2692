//! Mailbox names and message ids: whatever is accepted is safe as one path
//! component, and validation is idempotent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use powermail_proto::{MailboxName, MessageId};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = MailboxName::parse_bytes(data) {
        let s = m.as_str();
        assert!(!s.is_empty() && s.len() <= 254);
        assert!(!s.starts_with('.') && !s.contains('/') && !s.contains('\0'));
        assert!(s.bytes().all(|b| b > 0x20 && b != 0x7f));
        assert_eq!(s.matches('@').count(), 1);
        assert_eq!(
            MailboxName::parse(s).as_ref(),
            Ok(&m),
            "normalising twice changes nothing"
        );
    }
    if let Ok(id) = MessageId::parse_bytes(data) {
        let s = id.as_str();
        assert!(!s.is_empty() && s.len() <= 64 && !s.starts_with('.'));
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    }
});
