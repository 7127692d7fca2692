//! `powerpop`: PowerMail's POP3 frontend. See the library docs and
//! `examples/powerpop.toml`.

use powermail_admin::daemon::{self, Daemon, Invocation};
use powerpop::config::Config;

fn main() {
    keep_freed_memory();
    let daemon = Daemon {
        name: "powerpop",
        about: "PowerMail POP3 frontend",
    };
    daemon::run(&daemon, Config::parse, start);
}

fn start(cfg: Config, args: Invocation) -> anyhow::Result<()> {
    if args.check {
        println!("configuration OK: {} backends", cfg.backends.len());
        return Ok(());
    }
    powerpop::server::run(cfg, Some(args.config))
}

/// Bytes of free memory at the top of a malloc arena kept for reuse
/// instead of handed back to the kernel.
const TRIM_THRESHOLD_BYTES: libc::c_int = 64 << 20;
/// Allocations from this size on are mapped on their own (above the default
/// fetch-ahead window, `[serving] prefetch_bytes_max`, so fetched bodies come
/// from the arenas).
const MMAP_THRESHOLD_BYTES: libc::c_int = 4 << 20;

/// Every body fetched ahead is a fresh allocation of its size, freed once
/// sent. With glibc's defaults, session threads (each on an arena of its
/// own) handed the freed top of their arena back with `madvise(DONTNEED)`
/// at once, and the next body page-faulted it in again: under RETR of
/// 64 KiB messages, faults inside `memmove` were the largest cost in
/// powerpop after the sockets. Keeping up to 64 MiB per arena cut
/// powerpop's CPU per byte served by 12–19% (bench/RESULTS.md, session 6).
/// What is kept is memory the arena once used, never more than its peak;
/// the sessions' own bound (`prefetch_bytes_max` each) is unchanged.
fn keep_freed_memory() {
    // SAFETY: mallopt takes two integers and changes allocator settings only.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}
