//! powerpop: PowerMail's POP3 frontend.
//!
//! A synchronous, threaded server (one std thread per connection, bounded)
//! that authenticates against the userbase, asks **every** readable backend
//! for the mailbox listing in parallel, merges and deduplicates it, and
//! streams each message from one backend that holds it. See
//! `frontends/pop/README.md` for the design of deletion and locking.
//!
//! * [`ahead`] — which messages a RETR fetches ahead (`GETM`) and keeps;
//! * [`line`] and [`command`] — bounded, incremental parsing of client lines;
//! * [`session`] — the POP3 state machine, pure, behind a [`session::Store`];
//! * [`sasl`] — AUTH PLAIN;
//! * [`listing`] — parallel LIST to every backend, merge, soft failure;
//! * [`listing_cache`] — big mailboxes' merged listings kept while their
//!   generations hold;
//! * [`journal`] — deletions owed to backends that were down;
//! * [`lock`] — one session per mailbox, in and across processes and hosts
//!   (`powermail_frontend::lock`, shared with `ppadmin`);
//! * [`throttle`] — login-failure delay and lock-out;
//! * [`server`] — accept loop, connection threads, the read-answer loop;
//! * [`store`] — the live store: login, listing, RETR, QUIT's deletions;
//! * [`fallback`] — login at and relay to a legacy POP3 server;
//! * [`config`], [`stats`] — the TOML file and the admin port.

pub mod ahead;
pub mod command;
pub mod config;
pub mod fallback;
pub use powermail_frontend::journal;
pub mod line;
pub mod listing;
pub mod listing_cache;
pub use powermail_frontend::lock;
pub mod sasl;
pub mod server;
pub mod session;
pub mod stats;
pub mod store;
pub mod throttle;
