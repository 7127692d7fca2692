//! The topology's own test: hosts reach each other by their addresses, and
//! each fault does what the suites rely on (real sockets, real namespaces).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use powermail_cluster::{Net, Topology};
use powermail_testkit::skip_unless_root;

const PORT: u16 = 4000;
const WAIT: Duration = Duration::from_millis(800);

/// Connects from the calling thread (already inside a host).
fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&to, WAIT)
}

#[test]
fn hosts_talk_and_faults_cut_them_off() {
    if skip_unless_root("cluster net", "ip netns, ip link") {
        return;
    }
    let mut net = Net::new().expect("bridge");
    let a = net.add_host("a").expect("host a");
    let b = net.add_host("b").expect("host b");
    assert_ne!(a.addr, b.addr);
    let at_a = SocketAddr::from((a.addr, PORT));

    // An echo server inside host a, bound to a's address (not 127.0.0.1).
    let listener = a
        .run(move || TcpListener::bind(at_a).expect("bind in a"))
        .expect("enter a");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });

    b.run(move || {
        // Reachable by address from another host.
        let mut s = connect(at_a).expect("b reaches a");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        s.read_exact(&mut got).expect("echo");
        assert_eq!(&got, b"ping");
        s
    })
    .map(|mut s| {
        // The same connection, and new ones, while a is blackholed: silence,
        // no refusal.
        net.blackhole(&a).expect("blackhole");
        s.write_all(b"held").expect("buffered write");
        let mut got = [0u8; 4];
        let e = s
            .read_exact(&mut got)
            .expect_err("no answer through a blackhole");
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e:?}"
        );
        let fresh = b.run(move || connect(at_a).map(drop)).expect("enter b");
        let e = fresh.expect_err("a new connection gets no answer either");
        assert_eq!(
            e.kind(),
            ErrorKind::TimedOut,
            "silence, not a refusal: {e:?}"
        );
        // Healed: what was sent during the cut arrives (TCP retransmits).
        net.heal(&a).expect("heal");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.read_exact(&mut got).expect("echo after heal");
        assert_eq!(&got, b"held");
        // A pulled cable: nothing gets through until it is back.
        net.link_down(&a).expect("link down");
        let down = b.run(move || connect(at_a).map(drop)).expect("enter b");
        assert!(down.is_err(), "connected through a pulled cable");
        net.link_up(&a).expect("link up");
        let back = b
            .run(move || {
                // The port may take a moment to forward again.
                (0..50).find_map(|_| connect(at_a).ok()).is_some()
            })
            .expect("enter b");
        assert!(back, "no connection after the cable was back");
    })
    .expect("enter b");

    let names: Vec<&str> = net.hosts().iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn commands_run_inside_their_host() {
    if skip_unless_root("cluster net", "ip netns, ip link") {
        return;
    }
    let mut net = Net::new().expect("bridge");
    let h = net.add_host("solo").expect("host");
    let out = h
        .command("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip inside the host");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&h.addr.to_string()), "{text}");
    let others = text
        .lines()
        .filter(|l| l.contains(" inet ") && !l.contains("127.0.0.1"))
        .count();
    assert_eq!(others, 1, "sees only its own address: {text}");
}

/// The builder adds hosts in one order whatever order it was told (`db`,
/// storage, SMTP, POP, the others), writes the mailboxes before any daemon
/// starts, starts no frontend before `start_frontends`, and removes its
/// directory when dropped.
#[test]
fn a_topology_adds_its_hosts_in_one_order_with_its_mailboxes() {
    if skip_unless_root("cluster topology", "ip netns, ip link") {
        return;
    }
    let cluster = Topology::new("order")
        .host("client2")
        .pop(1)
        .smtp(2)
        .mailbox("a@cluster.test", "pw-a")
        .mailboxes([("b@cluster.test".to_string(), "pw-b".to_string())])
        .start_storage();
    let names: Vec<&str> = cluster
        .net
        .hosts()
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["smtp1", "smtp2", "pop1", "client2"]);
    assert_eq!(cluster.host("client2").addr, cluster.net.hosts()[3].addr);
    assert!(cluster.db_host.is_none() && cluster.db.is_none());
    assert!(cluster.storage.is_empty() && cluster.backends.is_empty());
    assert!(cluster.smtp.is_empty() && cluster.pop.is_empty());
    assert!(cluster.url.starts_with("sqlite://"), "{}", cluster.url);
    let ub = powermail_userbase::open(&cluster.url).expect("userbase");
    let mut mailboxes: Vec<String> = ub
        .list_mailboxes()
        .expect("list")
        .into_iter()
        .map(|m| m.name)
        .collect();
    mailboxes.sort();
    assert_eq!(mailboxes, ["a@cluster.test", "b@cluster.test"]);
    drop(ub);
    let root = cluster.root().to_path_buf();
    assert!(root.exists());
    drop(cluster);
    assert!(!root.exists(), "the case's directory outlived it");
}
