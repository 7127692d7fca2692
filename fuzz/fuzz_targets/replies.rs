//! PPL/1 replies (`proto/src/reply.rs`): any line or block, read as any
//! reply, never panics, and what reads back re-encodes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Replies are read as UTF-8 text (the client refuses anything else).
    if let Ok(text) = std::str::from_utf8(data) {
        powermail_proto::reply::check_round_trip(text);
    }
});
