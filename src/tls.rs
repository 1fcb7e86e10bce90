//! TLS termination (SPEC §3 `listen.tls`, §10).
//!
//! Owns turning the configured PEM chain and key into a rustls server
//! configuration that offers h2 and http/1.1 by ALPN. It is built with each
//! generation, so certificates reload with the rest of the configuration;
//! connections already established keep the certificate they started with.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// Sessions kept for TLS resumption. rustls keeps 256 by default, and a
/// full handshake stores two (two TLS 1.3 tickets), so only about 128
/// returning clients would resume; past that each reconnect pays the
/// certificate's signature again. These keep about 8,192 clients, for
/// about 5 MB when full (BENCHMARKS.md, session 16). A reload keeps the
/// cache only when the certificate and key are unchanged
/// (`reload::carry_tls_sessions`): no session made under an old
/// certificate is resumed.
pub const RESUMABLE_SESSIONS: usize = 16_384;

/// Build the server configuration from PEM bytes. Errors name the file.
pub fn server_config(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "{}: not a PEM certificate chain ({e})",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("{}: not a PEM private key ({e})", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "{} / {}: certificate and key do not form a usable pair ({e})",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(RESUMABLE_SESSIONS);
    Ok(Arc::new(config))
}
