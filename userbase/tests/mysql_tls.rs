//! TLS to MariaDB (feature `mysql-tls`): a user that the server only admits over TLS can
//! use the userbase with `tls=true`, and cannot without it.
//!
//! Needs `PM_TEST_MYSQL_URL` and `PM_TEST_MYSQL_TLS_CA` (both printed by
//! `.ci/mariadb.sh start`); skipped without them unless `CI` is set.
#![cfg(feature = "mysql-tls")]

use mysql::prelude::Queryable;
use powermail_userbase::{open, UserbaseError};

fn env_or_skip(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but {name} is unset: run `.ci/mariadb.sh start`")
        }
        _ => {
            eprintln!("skipping MySQL TLS: {name} unset");
            None
        }
    }
}

#[test]
fn tls_user_needs_tls() {
    let (Some(url), Some(ca)) = (
        env_or_skip("PM_TEST_MYSQL_URL"),
        env_or_skip("PM_TEST_MYSQL_TLS_CA"),
    ) else {
        return;
    };
    let base = url.split('?').next().unwrap_or(&url);
    let after_scheme = base.strip_prefix("mysql://").expect("mysql:// URL");
    let (authority, _) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let db = "powermail_test_tls";

    let mut admin =
        mysql::Conn::new(mysql::Opts::from_url(&format!("mysql://{authority}/")).expect("url"))
            .expect("connect");
    for sql in [
        format!("DROP DATABASE IF EXISTS `{db}`"),
        format!("CREATE DATABASE `{db}`"),
        "DROP USER IF EXISTS 'pm_tls'@'%'".to_string(),
        "CREATE USER 'pm_tls'@'%' IDENTIFIED BY 'pm-tls-pw' REQUIRE SSL".to_string(),
        format!("GRANT ALL ON `{db}`.* TO 'pm_tls'@'%'"),
    ] {
        admin
            .query_drop(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let user_url = format!(
        "mysql://pm_tls:pm-tls-pw@{host_port}/{db}?prefer_socket=false&connect_timeout_ms=2000"
    );

    let ub = open(&format!("{user_url}&tls=true&root_cert_path={ca}")).expect("open over TLS");
    ub.add_mailbox("tls@example.com", "pw", 0).expect("add");
    assert!(ub
        .authenticate("tls@example.com", "pw")
        .expect("auth")
        .is_some());

    // Without TLS the server refuses this user; with TLS but without our CA the client
    // refuses the server's certificate. Both are "unavailable", never "no such mailbox".
    for url in [user_url.clone(), format!("{user_url}&tls=true")] {
        match open(&url) {
            Err(UserbaseError::Unavailable(why)) => eprintln!("as expected: {why}"),
            Err(other) => panic!("{url}: expected Unavailable, got {other:?}"),
            Ok(_) => panic!("{url}: expected Unavailable, opened fine"),
        }
    }
}
