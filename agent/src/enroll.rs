//! Enrollment: turn a one-time token into the droplet's own certificate.
//!
//! The key pair is made here and the private key never leaves the droplet: only a CSR is
//! sent. The control plane's certificate is checked against the CA pin the token carries
//! (or `--ca-sha256`), so a token alone is enough to join safely; system roots are used
//! only when asked for (a control plane with a publicly trusted certificate).

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use flotilla::{
    identity,
    proto::{EnrollRequest, HostFacts, agent_gateway_client::AgentGatewayClient},
};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::{
    ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};

/// How the agent decides to trust the control plane it enrolls with.
#[derive(Clone, Debug)]
pub enum Trust {
    /// SHA-256 of the fleet CA certificate, lowercase hex.
    Pin(String),
    /// The system's root certificates.
    SystemRoots,
}

/// The CA pin inside a token `FLT1-<pin>-<id>-<secret>`.
pub fn pin_from_token(token: &str) -> Option<String> {
    let mut parts = token.trim().split('-');
    match (parts.next(), parts.next()) {
        (Some("FLT1"), Some(pin)) if pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(pin.to_ascii_lowercase())
        }
        _ => None,
    }
}

/// What enrollment gives the droplet.
#[derive(Debug)]
pub struct Enrolled {
    pub cert_pem: String,
    pub key_pem: String,
    pub bundle: Vec<String>,
}

/// Why enrollment failed: `Refused` needs an operator (a new token); `Unreachable` is
/// worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the control plane refused the enrollment: {0}")]
    Refused(String),
    #[error("cannot reach the control plane to enroll: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Local(#[from] anyhow::Error),
}

/// A fresh key pair and a CSR for it. The CSR asks for nothing: the control plane decides
/// the certificate's names.
pub fn key_and_csr() -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate().context("generating the droplet's key")?;
    let csr = CertificateParams::default().serialize_request(&key).context("making a CSR")?.pem()?;
    Ok((key, csr))
}

pub async fn enroll(url: &str, token: &str, trust: &Trust, host: HostFacts) -> Result<Enrolled, EnrollError> {
    let (key, csr_pem) = key_and_csr()?;
    let channel = connect(url, trust).await?;
    let request = EnrollRequest {
        token: token.trim().to_owned(),
        csr_pem,
        host: Some(host),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    let response = AgentGatewayClient::new(channel).enroll(request).await.map_err(|status| match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            EnrollError::Unreachable(status.message().to_owned())
        }
        _ => EnrollError::Refused(status.message().to_owned()),
    })?;
    let response = response.into_inner();
    let bundle = response.trust_bundle.unwrap_or_default().ca_certificates_pem;
    if let Trust::Pin(pin) = trust {
        let pinned = bundle.iter().any(|pem| {
            rustls_pemfile::certs(&mut pem.as_bytes()).flatten().any(|der| identity::sha256_hex(&der) == *pin)
        });
        if !pinned {
            return Err(anyhow::anyhow!("the trust bundle does not contain the pinned CA").into());
        }
    }
    Ok(Enrolled { cert_pem: response.certificate_chain_pem, key_pem: key.serialize_pem(), bundle })
}

async fn connect(url: &str, trust: &Trust) -> Result<tonic::transport::Channel, EnrollError> {
    let uri: Uri = url.parse().with_context(|| format!("--enroll-url {url:?} is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(anyhow::anyhow!("--enroll-url must be https://").into());
    }
    let host = uri.host().context("--enroll-url has no host")?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(7444);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut config = match trust {
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { pin: pin.clone(), provider }))
            .with_no_client_auth(),
        Trust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(host.clone()).context("the enrollment host is not a valid name")?;
    // The connector below does TLS itself; tonic must see a plain `http` URI or it refuses
    // to connect without its own TLS configuration.
    let plain = format!("http://{}:{port}", uri.host().unwrap_or_default());
    let endpoint = Endpoint::from_shared(plain)
        .context("the enrollment URL")?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, server_name, host) = (connector.clone(), server_name.clone(), host.clone());
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| EnrollError::Unreachable(flotilla::telemetry::error_chain(&e)))
}

/// Accepts a server chain only if it verifies up to a CA whose SHA-256 is the pin.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let pinned = intermediates.iter().find(|cert| identity::sha256_hex(cert) == self.pin).ok_or_else(|| {
            Error::General(
                "the control plane's CA does not match the pinned CA (--ca-sha256 or the token's pin)".into(),
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(pinned.clone().into_owned()).map_err(|e| Error::General(format!("the pinned CA: {e}")))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_read_from_a_token() {
        let pin = "ab".repeat(32);
        assert_eq!(pin_from_token(&format!("FLT1-{pin}-{}-{}", "0".repeat(32), "1".repeat(64))), Some(pin));
        assert_eq!(pin_from_token("FLT1-short-x-y"), None);
        assert_eq!(pin_from_token("SWMTKN-1-abc"), None);
    }

    #[test]
    fn the_csr_carries_no_private_key() -> anyhow::Result<()> {
        let (key, csr) = key_and_csr()?;
        let private = key.serialize_der();
        let csr_der = rustls_pemfile::read_one(&mut csr.as_bytes())?;
        let Some(rustls_pemfile::Item::Csr(der)) = csr_der else { anyhow::bail!("not a CSR") };
        // The private scalar: in ECPrivateKey, `INTEGER 1, OCTET STRING (32 bytes)`.
        let at = private.windows(5).position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20]).context("an EC key")?;
        let scalar = &private[at + 5..at + 5 + 32];
        assert!(!der.windows(32).any(|w| w == scalar), "the CSR must not carry the private key");
        assert!(!csr.contains(&key.serialize_pem()));
        Ok(())
    }
}
