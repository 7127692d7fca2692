//! powersmtp refusing to start: the error it prints names what is wrong
//! and never carries a password from its configuration.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use powermail_testkit::{bin, free_addr};

/// Longest a start that must fail may take.
const START_FAIL_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn a_bad_userbase_url_is_reported_without_its_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("powersmtp.toml");
    // `pool_max=zz` makes opening the userbase fail before any connection.
    let text = format!(
        "listen = \"{}\"\n\
         userbase = \"mysql://pm:Pw-leak-7c1@127.0.0.1:1/mail?pool_max=zz\"\n\
         secret = \"0123456789abcdef0123\"\n\
         [[backend]]\nname = \"b0\"\naddr = \"127.0.0.1:1\"\n",
        free_addr()
    );
    std::fs::write(&config, text).expect("write config");
    let mut child = Command::new(bin("powersmtp"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start powersmtp");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > START_FAIL_TIMEOUT {
            let _ = child.kill();
            panic!("powersmtp started with a malformed userbase URL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{printed}");
    assert!(
        printed.contains("pool_max=zz"),
        "the cause is named: {printed}"
    );
    assert!(
        printed.contains("mysql://pm:***@127.0.0.1:1/mail"),
        "{printed}"
    );
    assert!(
        !printed.contains("Pw-leak-7c1"),
        "password printed: {printed}"
    );
}
