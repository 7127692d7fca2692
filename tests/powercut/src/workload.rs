//! The clients: `writers` threads, each on its own PPL/1 connection, doing
//! PUTs (one to four mailboxes, some of them multi-MiB), DELs and DELMs of
//! their own messages until told to stop, and recording in the shared
//! [`Model`] what was sent and what was acknowledged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use powermail_proto::{BackendConn, MailboxName, MessageId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

use crate::model::{mailbox, Model, Msg, MAILBOX_COUNT};
use crate::rig::{IO_TIMEOUT, SECRET};

/// Bytes of live messages above which the clients only delete (keeps the
/// store, and each check's GETs, small).
pub const LIVE_MAX_BYTES: u64 = 24 << 20;
/// Largest message of the workload.
pub const MESSAGE_MAX_BYTES: usize = 3 << 20;
/// One PUT in this many is a multi-MiB message.
pub const LARGE_ONE_IN: u32 = 25;
/// Most ids in one DELM of the workload.
pub const DELM_MAX_IDS: usize = 6;

/// The model and the stop flag, shared by the clients.
#[derive(Default)]
pub struct Shared {
    model: Mutex<Model>,
    stop: AtomicBool,
}

impl Shared {
    /// The model.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running workload.
pub struct Workload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Starts `writers` clients against `addr`; message ids start with
    /// `c<cycle>`, so no id is ever reused.
    pub fn start(
        shared: Arc<Shared>,
        addr: SocketAddr,
        writers: usize,
        cycle: usize,
        seed: u64,
    ) -> Workload {
        shared.stop.store(false, Ordering::SeqCst);
        let threads = (0..writers)
            .map(|w| {
                let shared = shared.clone();
                let live_max_bytes = LIVE_MAX_BYTES / writers as u64;
                std::thread::spawn(move || {
                    let mut c = Client {
                        shared,
                        addr,
                        rng: StdRng::seed_from_u64(seed ^ ((w as u64) << 32) ^ cycle as u64),
                        prefix: format!("c{cycle}w{w}n"),
                        worker_tag: format!("w{w}n"),
                        live_max_bytes,
                        next: 0,
                    };
                    c.run();
                })
            })
            .collect();
        Workload { shared, threads }
    }

    /// Tells the clients to stop and waits for them (kill the backend
    /// first if it may hang).
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct Client {
    shared: Arc<Shared>,
    addr: SocketAddr,
    rng: StdRng,
    /// Prefix of this cycle's ids for this client.
    prefix: String,
    /// The part of an id that says which client slot owns it.
    worker_tag: String,
    live_max_bytes: u64,
    next: u64,
}

impl Client {
    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn run(&mut self) {
        let mut conn: Option<BackendConn> = None;
        while !self.stopped() {
            if conn.is_none() {
                conn = BackendConn::connect(self.addr, SECRET.as_bytes(), IO_TIMEOUT).ok();
            }
            let Some(c) = conn.as_mut() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if self.step(c).is_err() {
                // Whatever was in flight stays "maybe"; start over on a new
                // connection (the backend may be dead, or its disk).
                conn = None;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// This client's acknowledged links (from this and earlier cycles).
    fn owned(&self) -> Vec<(MailboxName, MessageId, u64)> {
        self.shared
            .model()
            .present_with_prefix("")
            .into_iter()
            // Ids are `c<cycle>w<slot>n<n>`: one `w`, so `w<slot>n` names the slot.
            .filter(|(_, id, _)| id.as_str().contains(&self.worker_tag))
            .collect()
    }

    fn step(&mut self, conn: &mut BackendConn) -> Result<(), ()> {
        let owned = self.owned();
        let live_bytes: u64 = owned.iter().map(|(_, _, s)| s).sum();
        let roll = self.rng.gen_range(0..100);
        if owned.is_empty() || (live_bytes < self.live_max_bytes && roll < 70) {
            self.put(conn)
        } else if roll % 3 == 0 {
            self.delm(conn, &owned)
        } else {
            self.del(conn, &owned)
        }
    }

    fn put(&mut self, conn: &mut BackendConn) -> Result<(), ()> {
        let msgid = MessageId::parse(&format!("{}{}", self.prefix, self.next)).expect("valid id");
        self.next += 1;
        let size = if self.rng.gen_ratio(1, LARGE_ONE_IN) {
            self.rng.gen_range(1 << 20..=MESSAGE_MAX_BYTES)
        } else {
            self.rng.gen_range(1..64 << 10)
        };
        let mut body = vec![0u8; size];
        self.rng.fill_bytes(&mut body);
        let count = self.rng.gen_range(1..=4);
        let mut all: Vec<usize> = (0..MAILBOX_COUNT).collect();
        all.shuffle(&mut self.rng);
        let mailboxes: Vec<MailboxName> = all[..count].iter().map(|i| mailbox(*i)).collect();
        self.shared
            .model()
            .put_sent(&msgid, &mailboxes, Msg::of(&body));
        conn.put(&msgid, &mailboxes, &body).map_err(|_| ())?;
        self.shared.model().put_acked(&msgid, &mailboxes);
        Ok(())
    }

    fn del(
        &mut self,
        conn: &mut BackendConn,
        owned: &[(MailboxName, MessageId, u64)],
    ) -> Result<(), ()> {
        let Some((mb, id, _)) = owned.choose(&mut self.rng) else {
            return Ok(());
        };
        self.shared.model().del_sent(mb, id);
        conn.del(mb, id).map_err(|_| ())?;
        self.shared.model().del_acked(mb, id);
        Ok(())
    }

    fn delm(
        &mut self,
        conn: &mut BackendConn,
        owned: &[(MailboxName, MessageId, u64)],
    ) -> Result<(), ()> {
        let Some((mb, _, _)) = owned.choose(&mut self.rng) else {
            return Ok(());
        };
        let ids: Vec<&MessageId> = owned
            .iter()
            .filter(|(m, _, _)| m == mb)
            .map(|(_, id, _)| id)
            .take(DELM_MAX_IDS)
            .collect();
        {
            let mut model = self.shared.model();
            for id in &ids {
                model.del_sent(mb, id);
            }
        }
        conn.del_many(mb, &ids).map_err(|_| ())?;
        let mut model = self.shared.model();
        for id in ids {
            model.del_acked(mb, id);
        }
        Ok(())
    }
}
