//! What the topology cases share: the daemons of a host started at its
//! place (namespace and address) through the test kit.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use powermail_cluster::Host;
use powermail_testkit::{
    BackendSpec, Frontend, FrontendSpec, Kind, Place, Pplistener, PplistenerSpec,
};

/// The backends' shared secret.
pub const SECRET: &str = "cluster-secret-0123456789";
/// Every admin port's token.
pub const TOKEN: &str = "cluster-admin-token";

/// Where `h`'s daemons run: its namespace, bound to its address.
pub fn place(h: &Host) -> Place {
    Place {
        netns: Some(h.netns.clone()),
        ip: h.addr.into(),
    }
}

/// The `group` line of a backend on storage host `h` (docs/DEPLOY.md: a
/// host's disks share its group, so K copies land on K hosts).
pub fn group(h: &Host) -> String {
    format!("group = \"{}\"\n", h.name)
}

/// One pplistener with one backend (named after the host) on each of
/// `storage`; returns them and the frontends' `[[backend]]` list (with the
/// host's `group`).
pub fn start_storage(
    root: &Path,
    storage: &[Host],
) -> (Vec<Pplistener>, Vec<(String, SocketAddr, String)>) {
    let listeners: Vec<Pplistener> = storage
        .iter()
        .map(|h| {
            let spec = PplistenerSpec {
                secret: SECRET.into(),
                admin_token: TOKEN.into(),
                extra: "blocking_threads = 4\n[limits]\nfree_bytes_min = 0\n".into(),
                backends: vec![BackendSpec::named(&h.name, root.join(&h.name))],
            };
            Pplistener::start_at(&place(h), root, &format!("pplistener-{}", h.name), &spec)
        })
        .collect();
    let backends = storage
        .iter()
        .zip(&listeners)
        .map(|(h, l)| (h.name.clone(), l.backends[0], group(h)))
        .collect();
    (listeners, backends)
}

/// A powersmtp or powerpop on host `h`, with its own state directory (as on
/// real hosts), over `backends` and the userbase at `url`.
pub fn start_frontend(
    root: &Path,
    kind: Kind,
    h: &Host,
    url: &str,
    backends: &[(String, SocketAddr, String)],
    extra: &str,
) -> Frontend {
    let state = root.join(format!("{}-state", h.name));
    let spec = FrontendSpec {
        kind,
        secret: SECRET.into(),
        admin_token: TOKEN.into(),
        userbase: url.to_string(),
        extra: format!("state_dir = \"{}\"\n{extra}", state.display()),
        backends: backends.to_vec(),
    };
    Frontend::start_at(&place(h), root, &h.name, &spec)
}

/// The password of test user `i`, in every case's userbase.
pub fn password(i: usize) -> String {
    format!("pw-{i}")
}

/// The header that numbers message `n` of a case tagged `tag` (first line of
/// every message a case sends; [`id_of`] reads it back).
pub fn id_header(tag: &str, n: usize) -> String {
    format!("X-Cluster-Id: {tag}-{n}\r\n")
}

/// The number of a retrieved message of the case tagged `tag`.
pub fn id_of(tag: &str, raw: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(raw);
    let prefix = format!("X-Cluster-Id: {tag}-");
    let at = text.find(&prefix)? + prefix.len();
    text[at..].split("\r\n").next()?.parse().ok()
}
