//! powersmtp: PowerMail's SMTP frontend, as a library so that its pure parts
//! are unit-tested and its binary stays thin.
//!
//! * [`data`] — DATA end detection and normalisation to the stored wire form;
//! * [`session`] — the SMTP state machine (no I/O);
//! * [`delivery`] — the real [`session::Delivery`]: userbase look-ups and
//!   streaming PUTs to K backends;
//! * [`relay`] — forwarding through the outgoing relay, inside the transaction;
//! * [`stats`] — the process-wide counters the admin port reads;
//! * [`undo`] — the undo journal: copies of refused messages deleted for sure;
//! * [`config`] — the TOML file;
//! * [`server`] — the threaded I/O loop and the admin port.

pub mod config;
pub mod data;
pub mod delivery;
pub mod relay;
pub mod server;
pub mod session;
pub mod stats;
pub mod undo;
pub mod usage_cache;
