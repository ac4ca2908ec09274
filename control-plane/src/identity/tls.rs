//! TLS for the agent port: a client certificate chaining to the fleet CA is required,
//! and the droplet it names is read from its URI SAN at the handshake.
//!
//! We run our own `tokio_rustls::TlsAcceptor` instead of tonic's `ServerTlsConfig`: it lets
//! handshakes run concurrently (a slow client never stalls the accept loop), refuses
//! certificates that name no droplet before any gRPC byte is read, and leaves room for a
//! custom verifier (revocation) and session resumption.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    identity::pki::{Authorities, Ca, Issued},
    identity::revocation::{RevocationAwareVerifier, Revocations},
};

/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent port's TLS configuration: our server certificate, and client certificates
/// required to chain to a CA in service and not to be revoked.
pub fn agent_server_config(
    authorities: &Authorities,
    server: &Issued,
    revocations: Revocations,
) -> anyhow::Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for ca in &authorities.trusted {
        roots.add(ca.clone()).context("adding a CA to the trust store")?;
    }
    let chain_check = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .context("building the client certificate verifier")?;
    let verifier = Arc::new(RevocationAwareVerifier { inner: chain_check, revocations });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain(server, &authorities.active)?, server_key(server)?)
        .context("loading the server certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The enrollment port's TLS configuration: server-authenticated only. A droplet checks
/// our chain against the CA pin in its token.
pub fn enroll_server_config(authorities: &Authorities, server: &Issued) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(server_chain(server, &authorities.active)?, server_key(server)?)
        .context("loading the server certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How the API port speaks.
#[derive(Debug, Clone, Default)]
pub enum ApiTls {
    /// A server certificate from the fleet CA (clients trust `<data-dir>/ca.crt`).
    #[default]
    FleetCa,
    /// A certificate chain and key from files, e.g. from a public CA, so that clients
    /// trusting only public CAs (Supabase Edge Functions) can call the API directly.
    Files { cert: std::path::PathBuf, key: std::path::PathBuf },
    /// No TLS: for local development, or behind a proxy that terminates TLS.
    Plaintext,
}

/// The API port's TLS configuration: gRPC needs HTTP/2, browsers and `fetch()` may speak
/// HTTP/1.1.
pub fn api_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("loading the API certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The API's certificate chain and key: from the fleet CA, or read from files.
pub fn api_identity(
    tls: &ApiTls,
    authorities: &Authorities,
    server: &Issued,
) -> anyhow::Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
    match tls {
        ApiTls::Plaintext => Ok(None),
        ApiTls::FleetCa => Ok(Some((server_chain(server, &authorities.active)?, server_key(server)?))),
        ApiTls::Files { cert, key } => {
            let read =
                |path: &std::path::Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
            let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing the certificates in {}", cert.display()))?;
            anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
            let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
                .with_context(|| format!("parsing {}", key.display()))?
                .with_context(|| format!("{} holds no private key", key.display()))?;
            Ok(Some((chain, key)))
        }
    }
}

fn server_chain(server: &Issued, ca: &Ca) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut chain = rustls_pemfile::certs(&mut server.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the server certificate")?;
    chain.push(ca.cert_der().clone());
    Ok(chain)
}

fn server_key(server: &Issued) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut server.key_pem.as_bytes())
        .context("parsing the server key")?
        .context("no private key in the server key PEM")
}

/// Accepts TLS connections (server-authenticated only) until `stop` is cancelled.
pub fn accept_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
    port: &'static str,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    accept(listener, config, stop, port, |io, _| Ok(io))
}

/// The accept loop: each TLS handshake completes on its own task, then `finish` decides
/// whether the connection is served.
pub fn accept<T: Send + 'static>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
    port: &'static str,
    finish: fn(TlsStream<TcpStream>, SocketAddr) -> Result<T, String>,
) -> ReceiverStream<Result<T, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote_addr) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: wait, don't spin.
                        tracing::warn!(%error, port, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let outcome = match handshake {
                    Err(_) => Err("TLS handshake timed out".to_owned()),
                    Ok(Err(error)) => Err(format!("TLS handshake failed: {error}")),
                    Ok(Ok(io)) => finish(io, remote_addr),
                };
                match outcome {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(reason) => tracing::info!(%remote_addr, %reason, port, "refused a connection"),
                }
            });
        }
        tracing::debug!(port, "stopped accepting connections");
    });
    ReceiverStream::new(rx)
}
