//! A cluster of "hosts" on one machine, for tests (issue #15): each host is
//! a Linux network namespace with its own address, joined to the others by a
//! veth pair on one bridge. Daemons run inside a host with
//! [`Host::command`]; test code enters one with [`Host::enter`] (per thread).
//!
//! Faults are real network faults, made on the host's bridge port:
//! * [`Net::blackhole`]: the port is set to `disabled`, so the bridge drops
//!   every frame to and from the host — no RST, no ICMP: peers see silence
//!   (the hard case); [`Net::heal`] forwards again, and TCP connections that
//!   lived through it resume by retransmission;
//! * [`Net::link_down`]: the host's cable is pulled (its veth end goes down).
//!
//! Everything needs root (`ip netns`, `ip link`); the test kit's
//! `skip_unless_root` says so. Names are unique per [`Net`] so parallel tests never collide, and
//! [`Drop`] removes every namespace, link and bridge it made.
//!
//! On top of the network: [`Topology`], the one builder of a case's hosts and
//! daemons (issue #17), and [`Tally`], the one POP3 retrieval loop.

mod blast;
mod mail;
mod topology;

pub use blast::{blast, deliver, Progress, Sent, SENDER, SENDERS_MAX};

pub use mail::{
    id_header, id_of, login_eventually, message, password, Tally, SESSION_MESSAGES_MAX,
};
pub use topology::{group, place, BackendEntry, Cluster, Topology, MAILBOXES_MAX, SECRET, TOKEN};

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Most hosts one [`Net`] holds (addresses `.1` to `.HOSTS_MAX`).
pub const HOSTS_MAX: usize = 200;

/// Runs `ip ARGS`, failing with its output when it fails.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    check(&format!("ip {}", args.join(" ")), out)
}

fn check(what: &str, out: Output) -> io::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

/// One simulated host: a network namespace with one address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Name given by the test (`storage1`, `smtp2`, `db`).
    pub name: String,
    /// The namespace (`ip netns` name).
    pub netns: String,
    /// The host's address on the cluster network.
    pub addr: Ipv4Addr,
    /// The bridge side of its veth pair (where faults are made).
    port: String,
}

impl Host {
    /// A command that runs `program` inside this host (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Moves the calling thread into this host's network: sockets it opens
    /// from now on bind, listen and connect there. Other threads stay put.
    pub fn enter(&self) -> io::Result<()> {
        let ns = File::open(format!("/var/run/netns/{}", self.netns))?;
        // SAFETY: a valid namespace descriptor for the whole call; setns
        // changes only the calling thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills every process inside this host with SIGKILL (the host's power
    /// cut, as far as its network peers can tell); returns how many.
    pub fn kill_all(&self) -> io::Result<usize> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()?;
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        for &pid in &pids {
            // SAFETY: kill(2) on a process inside a namespace this test made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Ok(pids.len())
    }

    /// Runs `f` on a new thread inside this host and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let host = self.clone();
        std::thread::spawn(move || host.enter().map(|()| f()))
            .join()
            .map_err(|_| io::Error::other("thread inside the host panicked"))?
    }
}

/// The cluster network: a bridge and the hosts on it.
pub struct Net {
    /// Short unique tag in every name this net makes (interface names are
    /// at most 15 bytes).
    tag: String,
    bridge: String,
    /// `10.<a>.<b>.0/24`, unique per net in this process.
    prefix: [u8; 3],
    hosts: Vec<Host>,
}

static NETS: AtomicU32 = AtomicU32::new(0);

impl Net {
    /// A new, empty network with its own bridge.
    pub fn new() -> io::Result<Net> {
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // pid and a counter, base 36, in 6 characters: unique per test run.
        let tag = base36((u64::from(pid) << 8 | u64::from(n & 0xff)) % 36u64.pow(6));
        let prefix = [10, 100 + (pid % 100) as u8, (n % 250) as u8];
        let bridge = format!("pm{tag}br");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Net {
            tag,
            bridge,
            prefix,
            hosts: Vec::new(),
        };
        // The machine itself is a host too (the clients of a test): the
        // bridge's address, so test code reaches every host without
        // entering a namespace — and a blackholed host is cut off from it.
        let me = format!("{}/24", net.client_addr());
        ip(&["addr", "add", &me, "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// Adds host `name` with the next address; its loopback is up.
    pub fn add_host(&mut self, name: &str) -> io::Result<Host> {
        let i = self.hosts.len() + 1;
        if i > HOSTS_MAX {
            return Err(io::Error::other(format!("more than {HOSTS_MAX} hosts")));
        }
        let netns = format!("pm{}-{name}", self.tag);
        let port = format!("pm{}p{i}", self.tag);
        let inside = format!("pm{}h{i}", self.tag);
        let [a, b, c] = self.prefix;
        let addr = Ipv4Addr::new(a, b, c, i as u8);
        ip(&["netns", "add", &netns])?;
        let host = Host {
            name: name.to_string(),
            netns: netns.clone(),
            addr,
            port: port.clone(),
        };
        // Recorded before the links exist, so Drop removes a half-made host.
        self.hosts.push(host.clone());
        ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &netns])?;
        ip(&["link", "set", &port, "master", &self.bridge])?;
        ip(&["link", "set", &port, "up"])?;
        let cidr = format!("{addr}/24");
        for args in [
            vec!["addr", "add", &cidr, "dev", &inside],
            vec!["link", "set", &inside, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["-n", &netns];
            full.extend(args);
            ip(&full)?;
        }
        Ok(host)
    }

    /// This machine's own address on the cluster network (`.254`): where
    /// test clients connect from.
    pub fn client_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 254)
    }

    /// The hosts, in the order they were added.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Drops every frame to and from `host` without a word (bridge port
    /// state `disabled`): peers see silence, as behind a dead switch port.
    pub fn blackhole(&self, host: &Host) -> io::Result<()> {
        self.port_state(host, "0")
    }

    /// Ends a [`Net::blackhole`]: the port forwards again.
    pub fn heal(&self, host: &Host) -> io::Result<()> {
        self.port_state(host, "3")
    }

    fn port_state(&self, host: &Host, state: &str) -> io::Result<()> {
        let out = Command::new("bridge")
            .args(["link", "set", "dev", &host.port, "state", state])
            .output()?;
        check(
            &format!("bridge link set dev {} state {state}", host.port),
            out,
        )
    }

    /// Pulls `host`'s cable: its link goes down at the bridge.
    pub fn link_down(&self, host: &Host) -> io::Result<()> {
        ip(&["link", "set", &host.port, "down"])
    }

    /// Plugs `host`'s cable back in.
    pub fn link_up(&self, host: &Host) -> io::Result<()> {
        ip(&["link", "set", &host.port, "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Deleting the namespace kills its veth end, and so the pair.
            let _ = ip(&["netns", "del", &h.netns]);
            let _ = ip(&["link", "del", &h.port]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fit_interface_names() {
        let t = base36(u64::MAX % 36u64.pow(6));
        assert_eq!(t.len(), 6);
        // "pm" + tag + "p200": the longest interface name this crate makes.
        assert!(format!("pm{t}p{HOSTS_MAX}").len() <= 15);
        assert_ne!(base36(1), base36(2));
    }
}
