//! The model of one disk: durable media (the backing image file) behind a
//! volatile write cache (a list of writes held in memory).
//!
//! What a real disk with a volatile cache promises, and all this one does:
//! * a write is acknowledged at once and only cached;
//! * a completed flush makes every write acknowledged before it durable;
//! * at a power cut, writes not yet flushed may be lost — all of them, any
//!   subset of them, or reach the media in any order — but nothing made
//!   durable by a completed flush is ever lost or changed;
//! * after the cut the disk is dead: every read, write and flush fails with
//!   `EIO` until the daemon is started again from the durable media.
//!
//! This module has no FUSE in it, so the unit tests drive it directly.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// What a power cut does to the writes still in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CutMode {
    /// Every unflushed write is lost.
    DropAll,
    /// Each unflushed write independently reaches the media or is lost
    /// (probability 1/2), in the order written.
    RandomSubset,
    /// A random subset of the unflushed writes reaches the media in a random
    /// order (an older write may land over a newer one of the same sectors).
    Reorder,
}

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The power was cut: the disk answers nothing until restarted.
    #[error("the power is cut")]
    PowerCut,
    /// The request reaches past the end of the image.
    #[error("{offset} + {len_bytes} is past the end of the image ({size_bytes} bytes)")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len_bytes: u64,
        /// Size of the image.
        size_bytes: u64,
    },
    /// The backing file failed.
    #[error("backing file: {0}")]
    Io(#[from] io::Error),
}

impl DiskError {
    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::PowerCut => libc::EIO,
            DiskError::OutOfRange { .. } => libc::ENOSPC,
            DiskError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// How a [`Disk`] behaves.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// What a cut does to unflushed writes.
    pub cut_mode: CutMode,
    /// Cut the power instead of completing this flush (1 = the first one).
    pub cut_at_flush: Option<u64>,
    /// Seed of the random choices of [`CutMode::RandomSubset`] and
    /// [`CutMode::Reorder`].
    pub seed: u64,
    /// Most bytes held in the cache; a write beyond writes the whole cache
    /// back first (a real disk may write back whenever it likes).
    pub cache_max_bytes: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            cut_mode: CutMode::DropAll,
            cut_at_flush: None,
            seed: 0,
            cache_max_bytes: 256 << 20,
        }
    }
}

/// Counters shown in the `status` file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Flushes completed.
    pub flushes: u64,
    /// Writes acknowledged.
    pub writes: u64,
    /// Writes in the cache right now.
    pub pending_writes: u64,
    /// Bytes in the cache right now.
    pub pending_bytes: u64,
    /// Times the whole cache was written back because it was full.
    pub writebacks: u64,
    /// Whether the power is cut.
    pub cut: bool,
    /// Writes lost at the cut.
    pub lost_writes: u64,
    /// Writes that reached the media at the cut.
    pub landed_writes: u64,
}

struct PendingWrite {
    offset: u64,
    data: Vec<u8>,
}

/// One disk: the image file plus its volatile cache.
pub struct Disk {
    backing: File,
    size_bytes: u64,
    pending: Vec<PendingWrite>,
    config: DiskConfig,
    rng: StdRng,
    stats: DiskStats,
}

impl Disk {
    /// A disk over `backing`, whose current contents are the durable media
    /// and whose length is the disk's size.
    pub fn new(backing: File, config: DiskConfig) -> io::Result<Disk> {
        let size_bytes = backing.metadata()?.len();
        Ok(Disk {
            backing,
            size_bytes,
            pending: Vec::new(),
            rng: StdRng::seed_from_u64(config.seed),
            config,
            stats: DiskStats::default(),
        })
    }

    /// Size of the disk in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The counters.
    pub fn stats(&self) -> DiskStats {
        let mut s = self.stats;
        s.pending_writes = self.pending.len() as u64;
        s
    }

    fn check(&self, offset: u64, len_bytes: u64) -> Result<(), DiskError> {
        if self.stats.cut {
            return Err(DiskError::PowerCut);
        }
        match offset.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    /// Reads `len_bytes` at `offset`: the media with the cached writes laid
    /// over it in the order they were made (what the drive would return).
    pub fn read(&mut self, offset: u64, len_bytes: u32) -> Result<Vec<u8>, DiskError> {
        self.check(offset, u64::from(len_bytes))?;
        let mut buf = vec![0u8; len_bytes as usize];
        self.backing.read_exact_at(&mut buf, offset)?;
        let end = offset + u64::from(len_bytes);
        for w in &self.pending {
            let w_end = w.offset + w.data.len() as u64;
            if w_end <= offset || w.offset >= end {
                continue;
            }
            let from = w.offset.max(offset);
            let to = w_end.min(end);
            let src = &w.data[(from - w.offset) as usize..(to - w.offset) as usize];
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        Ok(buf)
    }

    /// Caches a write; nothing reaches the media before a flush (or a
    /// write-back of a full cache).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check(offset, data.len() as u64)?;
        if self.stats.pending_bytes + data.len() as u64 > self.config.cache_max_bytes {
            self.write_back()?;
            self.stats.writebacks += 1;
        }
        self.pending.push(PendingWrite {
            offset,
            data: data.to_vec(),
        });
        self.stats.pending_bytes += data.len() as u64;
        self.stats.writes += 1;
        Ok(())
    }

    /// Makes every cached write durable — or, if this is the flush the
    /// config names, cuts the power instead and fails.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        if self.stats.cut {
            return Err(DiskError::PowerCut);
        }
        if self.config.cut_at_flush == Some(self.stats.flushes + 1) {
            self.cut()?;
            return Err(DiskError::PowerCut);
        }
        self.write_back()?;
        self.stats.flushes += 1;
        Ok(())
    }

    /// Writes the whole cache to the media, in order. The backing file is
    /// not fsynced: the host keeps its power, so its page cache is durable
    /// for this model.
    fn write_back(&mut self) -> Result<(), DiskError> {
        for w in self.pending.drain(..) {
            self.backing.write_all_at(&w.data, w.offset)?;
        }
        self.stats.pending_bytes = 0;
        Ok(())
    }

    /// Cuts the power: the cached writes meet the fate the [`CutMode`] says,
    /// and the disk fails everything from now on. Cutting twice is a no-op.
    pub fn cut(&mut self) -> Result<(), DiskError> {
        if self.stats.cut {
            return Ok(());
        }
        self.stats.cut = true;
        let mut pending = std::mem::take(&mut self.pending);
        self.stats.pending_bytes = 0;
        let total = pending.len() as u64;
        match self.config.cut_mode {
            CutMode::DropAll => pending.clear(),
            CutMode::RandomSubset => pending.retain(|_| self.rng.gen_bool(0.5)),
            CutMode::Reorder => {
                pending.retain(|_| self.rng.gen_bool(0.5));
                pending.shuffle(&mut self.rng);
            }
        }
        self.stats.landed_writes = pending.len() as u64;
        self.stats.lost_writes = total - pending.len() as u64;
        for w in &pending {
            self.backing.write_all_at(&w.data, w.offset)?;
        }
        Ok(())
    }

    /// Cuts the power instead of completing the `flushes_from_now`th flush
    /// from now (1 = the next one).
    pub fn arm(&mut self, flushes_from_now: u64) {
        self.config.cut_at_flush = Some(self.stats.flushes + flushes_from_now.max(1));
    }

    /// The flush count at which the power will be cut, if armed.
    pub fn armed_at_flush(&self) -> Option<u64> {
        self.config.cut_at_flush
    }

    /// A clean shutdown (not a cut): writes the cache back.
    pub fn shutdown(&mut self) -> Result<(), DiskError> {
        if self.stats.cut {
            return Ok(());
        }
        self.write_back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 << 10;

    fn disk(config: DiskConfig) -> (tempfile::NamedTempFile, Disk) {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(SIZE).expect("set_len");
        let d = Disk::new(f.reopen().expect("reopen"), config).expect("disk");
        (f, d)
    }

    fn media(f: &tempfile::NamedTempFile) -> Vec<u8> {
        std::fs::read(f.path()).expect("read media")
    }

    #[test]
    fn reads_see_cached_writes_in_order_but_media_does_not() {
        let (f, mut d) = disk(DiskConfig::default());
        d.write(0, &[1; 8]).expect("write");
        d.write(4, &[2; 8]).expect("write");
        assert_eq!(
            d.read(0, 16).expect("read"),
            [[1; 4], [2; 4], [2; 4], [0; 4]].concat()
        );
        assert_eq!(media(&f)[..16], [0; 16], "nothing durable before a flush");
        d.flush().expect("flush");
        assert_eq!(media(&f)[..16], [[1; 4], [2; 4], [2; 4], [0; 4]].concat());
    }

    #[test]
    fn a_cut_loses_unflushed_writes_and_keeps_flushed_ones() {
        let (f, mut d) = disk(DiskConfig::default());
        d.write(0, &[7; 4096]).expect("write");
        d.flush().expect("flush");
        d.write(0, &[9; 4096]).expect("write");
        d.write(8192, &[9; 4096]).expect("write");
        d.cut().expect("cut");
        let m = media(&f);
        assert_eq!(m[..4096], [7; 4096]);
        assert_eq!(m[8192..12288], [0; 4096]);
        assert_eq!(d.stats().lost_writes, 2);
    }

    #[test]
    fn after_a_cut_everything_fails_and_nothing_reaches_the_media() {
        let (f, mut d) = disk(DiskConfig::default());
        d.cut().expect("cut");
        assert!(matches!(d.write(0, &[1; 512]), Err(DiskError::PowerCut)));
        assert!(matches!(d.flush(), Err(DiskError::PowerCut)));
        assert!(matches!(d.read(0, 512), Err(DiskError::PowerCut)));
        assert_eq!(DiskError::PowerCut.errno(), libc::EIO);
        assert!(media(&f).iter().all(|b| *b == 0));
    }

    #[test]
    fn the_nth_flush_cuts_instead_of_completing() {
        let (f, mut d) = disk(DiskConfig {
            cut_at_flush: Some(2),
            ..DiskConfig::default()
        });
        d.write(0, &[1; 512]).expect("write");
        d.flush().expect("first flush completes");
        d.write(512, &[2; 512]).expect("write");
        assert!(matches!(d.flush(), Err(DiskError::PowerCut)));
        assert!(d.stats().cut);
        assert_eq!(d.stats().flushes, 1);
        let m = media(&f);
        assert_eq!(m[..512], [1; 512]);
        assert_eq!(
            m[512..1024],
            [0; 512],
            "the write before the failed flush is lost"
        );
    }

    #[test]
    fn arm_counts_from_now() {
        let (_f, mut d) = disk(DiskConfig::default());
        d.flush().expect("flush");
        d.flush().expect("flush");
        d.arm(2);
        assert_eq!(d.armed_at_flush(), Some(4));
        d.flush().expect("the first flush after arming completes");
        assert!(matches!(d.flush(), Err(DiskError::PowerCut)));
        assert_eq!(d.stats().flushes, 3);
    }

    /// Every sector ends as its durable version or one of its cached
    /// versions; durable sectors that were not rewritten never change.
    #[test]
    fn random_and_reordered_cuts_never_touch_flushed_data() {
        for mode in [CutMode::RandomSubset, CutMode::Reorder] {
            let mut landed = 0;
            for seed in 0..40 {
                let (f, mut d) = disk(DiskConfig {
                    cut_mode: mode,
                    seed,
                    ..DiskConfig::default()
                });
                d.write(0, &[0xAA; 4096]).expect("write");
                d.flush().expect("flush");
                for v in 1..=6u8 {
                    d.write(4096, &[v; 512]).expect("write");
                    d.write(8192 + u64::from(v) * 512, &[v; 512])
                        .expect("write");
                }
                d.cut().expect("cut");
                let m = media(&f);
                assert_eq!(
                    m[..4096],
                    [0xAA; 4096],
                    "{mode:?} seed {seed}: flushed data changed"
                );
                let s = m[4096];
                assert!(
                    s <= 6 && m[4096..4608].iter().all(|b| *b == s),
                    "{mode:?}: torn"
                );
                for v in 1..=6usize {
                    let sector = &m[8192 + v * 512..8192 + (v + 1) * 512];
                    assert!(sector.iter().all(|b| *b == 0) || sector.iter().all(|b| *b == v as u8));
                }
                landed += d.stats().landed_writes;
                assert_eq!(d.stats().landed_writes + d.stats().lost_writes, 12);
            }
            assert!(
                landed > 0 && landed < 40 * 12,
                "{mode:?}: some land, some are lost"
            );
        }
    }

    #[test]
    fn a_full_cache_is_written_back() {
        let (f, mut d) = disk(DiskConfig {
            cache_max_bytes: 1024,
            ..DiskConfig::default()
        });
        d.write(0, &[1; 1024]).expect("write");
        d.write(1024, &[2; 512]).expect("write");
        assert_eq!(d.stats().writebacks, 1);
        d.cut().expect("cut");
        let m = media(&f);
        assert_eq!(m[..1024], [1; 1024], "written back before the cut");
        assert_eq!(m[1024..1536], [0; 512]);
    }

    #[test]
    fn writes_past_the_end_are_refused() {
        let (_f, mut d) = disk(DiskConfig::default());
        assert!(matches!(
            d.write(SIZE - 1, &[1; 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read(u64::MAX, 1),
            Err(DiskError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_clean_shutdown_keeps_everything() {
        let (f, mut d) = disk(DiskConfig::default());
        d.write(0, &[3; 512]).expect("write");
        d.shutdown().expect("shutdown");
        assert_eq!(media(&f)[..512], [3; 512]);
    }
}
