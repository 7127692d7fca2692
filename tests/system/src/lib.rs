//! System tests for PowerMail; the code lives in `tests/` (`fault.rs`,
//! `hostile.rs`, and the shared harness in `tests/common/`). They start the
//! real `pplistener`, `powersmtp` and `powerpop` binaries from the target
//! directory (`tests/run` builds them first) and drive them with real
//! SMTP, POP3, PPL/1 and HTTP clients.
