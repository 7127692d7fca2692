//! Configuration pieces every frontend has in the same form: the TLS
//! certificate, the userbase cache and the backend secret. One definition, so
//! `powersmtp.toml` and `powerpop.toml` cannot drift apart.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// A certificate and key (STARTTLS / STLS / implicit TLS).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsSettings {
    /// Loads the certificate and key into a rustls server configuration.
    pub fn load(&self) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
        let open = |p: &PathBuf| {
            std::fs::File::open(p)
                .map(std::io::BufReader::new)
                .with_context(|| format!("opening {}", p.display()))
        };
        let certs = rustls_pemfile::certs(&mut open(&self.cert_file)?)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", self.cert_file.display()))?;
        if certs.is_empty() {
            bail!("no certificate in {}", self.cert_file.display());
        }
        let key = rustls_pemfile::private_key(&mut open(&self.key_file)?)
            .with_context(|| format!("reading {}", self.key_file.display()))?
            .with_context(|| format!("no private key in {}", self.key_file.display()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(std::sync::Arc::new(cfg))
    }
}

/// How long userbase answers are reused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// A found mailbox is reused this long (a changed password keeps working
    /// for up to this long).
    pub positive_ttl_ms: u64,
    /// "No such mailbox" is reused this long.
    pub negative_ttl_ms: u64,
    /// Most cached answers.
    pub max_entries: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            positive_ttl_ms: 30_000,
            negative_ttl_ms: 5_000,
            max_entries: 10_000,
        }
    }
}
