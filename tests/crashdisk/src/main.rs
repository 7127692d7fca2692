//! `crashdisk --image FILE --mount DIR`: serves FILE as `DIR/disk.img`
//! through a volatile write cache until DIR is unmounted. Write `cut` to
//! `DIR/ctl` to cut the power, `arm N` to cut it at the Nth flush from now;
//! read `DIR/status` for the counters. A clean unmount writes the cache
//! back; after a cut nothing more reaches FILE.

use std::path::PathBuf;

use clap::Parser;
use crashdisk::{CrashFs, CutMode, Disk, DiskConfig};

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "A FUSE disk with a volatile write cache and a power switch")]
struct Args {
    /// The backing image: the disk's durable media (its length is the size).
    #[arg(long)]
    image: PathBuf,
    /// Where to mount (an existing empty directory).
    #[arg(long)]
    mount: PathBuf,
    /// What a cut does to unflushed writes.
    #[arg(long, value_enum, default_value = "drop-all")]
    cut_mode: CutMode,
    /// Seed of the random choices of a cut.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cut the power instead of completing this flush (1 = the first).
    #[arg(long)]
    cut_at_flush: Option<u64>,
    /// Most MiB held in the cache before it is written back.
    #[arg(long, default_value_t = 256)]
    cache_max_mib: u64,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args = Args::parse();
    let backing = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.image)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crashdisk: {}: {e}", args.image.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let config = DiskConfig {
        cut_mode: args.cut_mode,
        cut_at_flush: args.cut_at_flush,
        seed: args.seed,
        cache_max_bytes: args.cache_max_mib << 20,
    };
    let disk = match Disk::new(backing, config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crashdisk: {}: {e}", args.image.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("crashdisk".into()),
        fuser::MountOption::RW,
    ];
    match fuser::mount(CrashFs::new(disk), &args.mount, &options) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crashdisk: mount {}: {e}", args.mount.display());
            std::process::ExitCode::FAILURE
        }
    }
}
