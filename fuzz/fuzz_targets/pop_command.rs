//! POP3 line splitter and command parser: bounded memory, no panics, and
//! every complete line within the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use powerpop::command::Command;
use powerpop::line::{Line, LineReader};

const LINE_MAX_BYTES: usize = 255;

fuzz_target!(|data: &[u8]| {
    let mut reader = LineReader::new(LINE_MAX_BYTES);
    for chunk in data.chunks(7) {
        reader.feed(chunk);
        while let Some(line) = reader.next_line() {
            if let Line::Complete(l) = line {
                assert!(
                    l.len() <= LINE_MAX_BYTES,
                    "line of {} bytes passed the limit",
                    l.len()
                );
                let _ = Command::parse(&l);
            }
        }
        assert!(
            reader.buffered() <= LINE_MAX_BYTES + 2 + 7,
            "buffered {}",
            reader.buffered()
        );
    }
});
