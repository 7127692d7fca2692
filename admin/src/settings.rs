//! The admin-port keys every daemon's configuration file has, declared once.
//!
//! [`AdminSettings`] is `#[serde(flatten)]`ed into pplistener's `Config` and
//! into the frontends' shared `FrontendSettings`, so `admin_listen`,
//! `admin_token`, `admin_connections_max` and `admin_request_timeout_ms` have
//! one definition, one set of defaults and one start-up rule (the token falls
//! back to the backend secret) in all three daemons.

use std::sync::Arc;

use serde::Deserialize;

use crate::{
    default_connections_max, default_request_timeout_ms, spawn, AdminError, AdminHandler,
    AdminLimits, AdminServer,
};

/// The admin port's keys, at the top level of a daemon's TOML file.
///
/// Not `deny_unknown_fields` itself (serde does not combine that with
/// `flatten`): the daemon's outer struct is, and refuses every key that
/// neither it nor this block takes.
#[derive(Debug, Clone, Deserialize)]
pub struct AdminSettings {
    /// Admin HTTP port (stats, metrics, runtime switches); none: no admin port.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Bearer token for the admin port (`Authorization: Bearer ...`);
    /// default: the backend secret.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Admin connections served at once (one thread each); beyond: `503` and close.
    #[serde(default = "default_connections_max")]
    pub admin_connections_max: usize,
    /// The longest one admin connection may take, in ms, to send its request
    /// and read the answer; then it is closed (slow or silent clients).
    #[serde(default = "default_request_timeout_ms")]
    pub admin_request_timeout_ms: u64,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            admin_listen: None,
            admin_token: None,
            admin_connections_max: default_connections_max(),
            admin_request_timeout_ms: default_request_timeout_ms(),
        }
    }
}

impl AdminSettings {
    /// The admin port's limits (`admin_connections_max`, `admin_request_timeout_ms`).
    pub fn limits(&self) -> AdminLimits {
        AdminLimits {
            connections_max: self.admin_connections_max,
            request_timeout_ms: self.admin_request_timeout_ms,
        }
    }

    /// The token requests must carry: `admin_token`, else the backend secret.
    pub fn token(&self, secret: &[u8]) -> String {
        match &self.admin_token {
            Some(t) => t.clone(),
            None => String::from_utf8_lossy(secret).into_owned(),
        }
    }

    /// Starts the admin port when `admin_listen` is set; `Ok(None)` when it is not.
    pub fn start(
        &self,
        secret: &[u8],
        handler: Arc<dyn AdminHandler>,
    ) -> Result<Option<AdminServer>, AdminError> {
        match &self.admin_listen {
            None => Ok(None),
            Some(listen) => spawn(listen, &self.token(secret), handler, self.limits()).map(Some),
        }
    }

    /// The keys for a daemon's `/config`: everything but the token.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "admin_listen": self.admin_listen,
            "admin_connections_max": self.admin_connections_max,
            "admin_request_timeout_ms": self.admin_request_timeout_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Nothing;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        own: u32,
        #[serde(flatten)]
        admin: AdminSettings,
    }

    #[test]
    fn defaults_and_flattened_keys() {
        let o: Outer = toml::from_str("own = 1\n").expect("parses");
        assert_eq!(o.own, 1);
        assert_eq!(o.admin.admin_listen, None);
        assert_eq!(o.admin.admin_connections_max, default_connections_max());
        assert_eq!(
            o.admin.admin_request_timeout_ms,
            default_request_timeout_ms()
        );
        let o: Outer = toml::from_str(
            "own = 2\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"t\"\n\
             admin_connections_max = 3\nadmin_request_timeout_ms = 4\n",
        )
        .expect("parses");
        assert_eq!(o.admin.admin_listen.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(o.admin.limits().connections_max, 3);
        assert_eq!(o.admin.limits().request_timeout_ms, 4);
    }

    #[test]
    fn unknown_keys_still_refused_through_the_flatten() {
        assert!(toml::from_str::<Outer>("own = 1\nadmin_lsten = \"x\"\n").is_err());
        assert!(toml::from_str::<Outer>("own = 1\nadmin_connections_max = \"x\"\n").is_err());
    }

    #[test]
    fn token_falls_back_to_the_secret_and_is_never_public() {
        let mut s = AdminSettings::default();
        assert_eq!(s.token(b"sixteen-byte-secret"), "sixteen-byte-secret");
        s.admin_token = Some("tok".into());
        assert_eq!(s.token(b"sixteen-byte-secret"), "tok");
        assert!(!s.public_json().to_string().contains("tok"));
    }

    #[test]
    fn no_listen_no_port() {
        let s = AdminSettings::default();
        assert!(s
            .start(b"x", Arc::new(Nothing))
            .expect("no error")
            .is_none());
        let s = AdminSettings {
            admin_listen: Some("127.0.0.1:0".into()),
            ..AdminSettings::default()
        };
        let server = s
            .start(b"0123456789abcdef", Arc::new(Nothing))
            .expect("starts");
        assert!(server.is_some_and(|srv| srv.local_addr().port() != 0));
    }
}
