//! TLS on the main port: wss:// and https:// beside ws:// and http://, told apart by the first
//! byte a client sends (a TLS handshake record starts with 0x16; an HTTP request never does).
//!
//! rustls with the `ring` provider. The certificate chain and key are PEM files, read at start
//! and again on SIGHUP; a connection keeps the configuration it was accepted with.
//!
//! On the WebSocket path a TLS connection cannot share broadcast frames byte for byte: each
//! frame is encrypted into that connection's own record (`shard::conn`), so TLS costs a copy
//! and an AES-GCM pass per subscriber. Behind a TLS-terminating load balancer, plain ws:// keeps
//! the zero-copy path.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::TlsFiles;

/// First byte of a TLS record carrying a handshake (ClientHello).
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Reads the PEM files and builds the server configuration (TLS 1.2 and 1.3, ALPN http/1.1).
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("cannot read TLS certificate {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid TLS certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no certificate in {} (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("cannot read TLS key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "TLS certificate {} and key {} do not work together: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
