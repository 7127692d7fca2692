//! The delete journal: deletions owed to backends that could not take them.
//!
//! At QUIT a message is deleted on every backend that listed it. When one of
//! those backends fails — or a backend was not listed at all in this session
//! (down, slow, disabled) and might hold a copy — the deletion is appended
//! here and `fsync`ed before the client hears `+OK`. Before a backend's
//! listing of a mailbox is used again, the deletions owed to it for that
//! mailbox are replayed (DEL; "not found" counts as done) and anything still
//! owed is filtered out of the listing, so deleted mail never comes back.
//!
//! Format: one record per line, `D <backend> <mailbox> <msgid>` (owed) or
//! `C <backend> <mailbox> <msgid>` (done). Names cannot contain spaces or
//! newlines (see `powermail_proto::names`), so no escaping is needed. Every
//! powerpop process of a host appends to the same file (`O_APPEND`, one
//! `write` per batch) and reads what the others appended before each use, so
//! the journal is shared. At start-up, a process that finds itself alone
//! (an exclusive `flock` on `journal.lock` succeeds) rewrites the file with
//! only the records still owed; every process then holds a shared lock for
//! its lifetime so no one compacts under a running peer.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// One deletion: backend name, mailbox, message id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owed {
    /// The backend's configured name.
    pub backend: String,
    /// The normalised mailbox name.
    pub mailbox: String,
    /// The message id.
    pub msgid: String,
}

type Key = (String, String);

#[derive(Debug, Default)]
struct State {
    /// Bytes of the file already applied to `owed`.
    offset: u64,
    owed: HashMap<Key, HashSet<String>>,
}

impl State {
    /// Applies complete lines of `text`; returns the bytes consumed.
    fn apply(&mut self, text: &[u8]) -> usize {
        let end = match text.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => return 0,
        };
        for line in text[..end].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let mut w = line.split(' ');
            let (Some(kind), Some(b), Some(m), Some(id), None) =
                (w.next(), w.next(), w.next(), w.next(), w.next())
            else {
                if !line.is_empty() {
                    log::warn!("delete journal: skipping malformed record {line:?}");
                }
                continue;
            };
            let key = (b.to_string(), m.to_string());
            match kind {
                "D" => {
                    self.owed.entry(key).or_default().insert(id.to_string());
                }
                "C" => {
                    if let Some(set) = self.owed.get_mut(&key) {
                        set.remove(id);
                        if set.is_empty() {
                            self.owed.remove(&key);
                        }
                    }
                }
                _ => log::warn!(
                    "delete journal: unknown record={}",
                    powermail_admin::kv(&*line)
                ),
            }
        }
        end
    }

    fn count(&self) -> usize {
        self.owed.values().map(HashSet::len).sum()
    }
}

/// The journal of one state directory; see the module documentation.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Held (shared) for the process's life; see the module documentation.
    _lock: File,
    state: Mutex<State>,
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn render(kind: char, records: &[Owed]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(
            format!("{kind} {} {} {}\n", r.backend, r.mailbox, r.msgid).as_bytes(),
        );
    }
    out
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (creating) `dir/deletes.journal`, compacting it if no other
    /// process uses it.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("journal.lock"))?;
        let path = dir.join("deletes.journal");
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            Self::compact(&path, dir)?;
        }
        flock(&lock, libc::LOCK_SH)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        let journal = Journal {
            path,
            file,
            _lock: lock,
            state: Mutex::new(State::default()),
        };
        journal.refresh()?;
        Ok(journal)
    }

    /// Rewrites the journal with only what is still owed (caller is alone).
    fn compact(path: &Path, dir: &Path) -> io::Result<()> {
        let mut text = Vec::new();
        match File::open(path) {
            Ok(mut f) => f.read_to_end(&mut text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut st = State::default();
        let used = st.apply(&text);
        if used != text.len() {
            log::warn!("delete journal: dropping a torn last record");
        }
        let mut owed: Vec<Owed> = st
            .owed
            .into_iter()
            .flat_map(|((backend, mailbox), ids)| {
                ids.into_iter().map(move |msgid| Owed {
                    backend: backend.clone(),
                    mailbox: mailbox.clone(),
                    msgid,
                })
            })
            .collect();
        owed.sort_by(|a, b| {
            (&a.backend, &a.mailbox, &a.msgid).cmp(&(&b.backend, &b.mailbox, &b.msgid))
        });
        let tmp = dir.join("deletes.journal.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&render('D', &owed))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)?;
        if !owed.is_empty() {
            log::info!("delete journal: {} deletions still owed", owed.len());
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies what any process appended since the last look.
    fn refresh_locked(&self, st: &mut State) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < st.offset {
            // Cannot happen while we hold the shared lock; recover anyway.
            *st = State::default();
        }
        if len == st.offset {
            return Ok(());
        }
        let mut buf = vec![0u8; (len - st.offset) as usize];
        self.file.read_exact_at(&mut buf, st.offset)?;
        let used = st.apply(&buf);
        st.offset += used as u64;
        Ok(())
    }

    /// Re-reads records appended by other processes.
    pub fn refresh(&self) -> io::Result<()> {
        let mut st = self.lock();
        self.refresh_locked(&mut st)
    }

    fn append(&self, kind: char, records: &[Owed], durable: bool) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let text = render(kind, records);
        let mut st = self.lock();
        (&self.file).write_all(&text)?;
        if durable {
            self.file.sync_data()?;
        }
        self.refresh_locked(&mut st)
    }

    /// Records deletions owed, durably (`fdatasync`) before returning.
    pub fn record(&self, owed: &[Owed]) -> io::Result<()> {
        self.append('D', owed, true)
    }

    /// Records deletions done. Not synced: a lost `C` only means one more
    /// harmless DEL ("not found") later.
    pub fn complete(&self, done: &[Owed]) -> io::Result<()> {
        self.append('C', done, false)
    }

    /// The message ids owed to `backend` for `mailbox` (after a refresh; on a
    /// read error, what is known so far).
    pub fn owed(&self, backend: &str, mailbox: &str) -> Vec<String> {
        let mut st = self.lock();
        if let Err(e) = self.refresh_locked(&mut st) {
            log::error!("delete journal {}: {e}", self.path.display());
        }
        st.owed
            .get(&(backend.to_string(), mailbox.to_string()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletions owed in total.
    pub fn owed_count(&self) -> usize {
        let mut st = self.lock();
        let _ = self.refresh_locked(&mut st);
        st.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owed(b: &str, m: &str, id: &str) -> Owed {
        Owed {
            backend: b.into(),
            mailbox: m.into(),
            msgid: id.into(),
        }
    }

    #[test]
    fn records_survive_reopen_and_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let a = Journal::open(dir.path()).unwrap();
        let b = Journal::open(dir.path()).unwrap();
        a.record(&[
            owed("b0", "x@y", "1"),
            owed("b0", "x@y", "2"),
            owed("b1", "x@y", "1"),
        ])
        .unwrap();
        let mut got = b.owed("b0", "x@y");
        got.sort();
        assert_eq!(got, vec!["1", "2"], "another handle sees the records");
        b.complete(&[owed("b0", "x@y", "1")]).unwrap();
        assert_eq!(a.owed("b0", "x@y"), vec!["2"]);
        assert_eq!(a.owed_count(), 2);
        drop((a, b));
        // Alone now: reopening compacts to what is still owed.
        let c = Journal::open(dir.path()).unwrap();
        assert_eq!(c.owed_count(), 2);
        let text = std::fs::read_to_string(dir.path().join("deletes.journal")).unwrap();
        assert_eq!(text, "D b0 x@y 2\nD b1 x@y 1\n");
    }

    #[test]
    fn torn_and_malformed_records_are_skipped() {
        let mut st = State::default();
        let used = st.apply(b"D a m 1\ngarbage\nD a m 2\nD a m");
        assert_eq!(used, 24);
        assert_eq!(st.count(), 2);
    }
}
