//! Issue #16: catch-all rows have a real destination. Mail to an unknown
//! address of a domain whose `*@domain` row names a mailbox (`deliver_to`)
//! lands in that mailbox and is read over POP3; a catch-all with no
//! destination refuses the recipient instead of storing mail nobody can read.

mod common;

use common::*;

#[test]
fn catch_all_mail_is_read_over_pop3_in_the_named_mailbox() {
    let _g = serial();
    let root = tempfile::tempdir().expect("tempdir");
    let b = Backend::start(root.path(), 0, root.path().join("disk0"), "");
    let url = sqlite_userbase(root.path(), 1);
    let ub = powermail_userbase::open(&url).expect("userbase");
    let catch_all = format!("*@{DOMAIN}");
    ub.add_mailbox(&catch_all, "unused", 0).expect("catch-all");
    ub.set_deliver_to(&catch_all, Some(user(0).as_str()))
        .expect("deliver_to");
    ub.add_mailbox("*@bare.test", "unused", 0)
        .expect("catch-all without a destination");
    let smtp = Frontend::smtp(root.path(), &[&b], &url, 1, "", "", &[]);
    let pop = Frontend::pop(root.path(), &[&b], &url, "", "");

    let mut c = Smtp::connect(smtp.addr).expect("connect");
    let stray = message("stray", 700);
    let to = format!("no-such-user@{DOMAIN}");
    assert_eq!(
        c.send("a@sender.test", &[&to], &stray).expect("send"),
        250,
        "accepted through the catch-all\n{}",
        smtp.log_text()
    );
    assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").expect("MAIL").0, 250);
    let (code, text) = c.cmd("RCPT TO:<x@bare.test>").expect("RCPT");
    assert_eq!(code, 550, "no destination: refused, not stored: {text}");
    assert_eq!(c.cmd("RSET").expect("RSET").0, 250);
    c.quit();

    // Nothing is stored under the catch-all's own name.
    let names: Vec<String> = b.links().into_iter().map(|(m, _)| m).collect();
    assert_eq!(names, vec![user(0)], "stored in the named mailbox only");

    let mut p = pop_login(pop.addr, 0).expect("login as the named mailbox");
    let uidl = p.uidl().expect("UIDL");
    assert_eq!(uidl.len(), 1, "one message");
    let raw = p.retr(1).expect("RETR");
    let (id, hash) = identify(&raw).expect("a suite message");
    assert_eq!((id.as_str(), hash), ("stray", sha(&stray)), "same bytes");
    p.quit().expect("QUIT");
}
