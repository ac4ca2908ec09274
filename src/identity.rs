//! How a droplet is named: a UUID, carried in its client certificate as the URI SAN
//! `spiffe://flotilla/droplet/<uuid>`.
//!
//! The control plane reads a droplet's identity only from the certificate that
//! authenticated the TLS session, never from a field of a message.

use std::{fmt, str::FromStr};

use uuid::Uuid;
use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

/// The URI prefix of a droplet's SAN.
pub const SAN_PREFIX: &str = "spiffe://flotilla/droplet/";

/// A droplet's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropletId(Uuid);

impl DropletId {
    /// A fresh, random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The URI SAN that names this droplet in a certificate.
    pub fn san_uri(&self) -> String {
        format!("{SAN_PREFIX}{}", self.0)
    }

    /// Parses a droplet URI SAN; `None` for any other URI.
    pub fn from_san_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(SAN_PREFIX)?;
        // Only the canonical hyphenated form: one droplet, one spelling.
        let id = Uuid::try_parse(rest).ok()?;
        (id.hyphenated().to_string() == rest).then_some(Self(id))
    }
}

impl Default for DropletId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DropletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for DropletId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s).map(Self)
    }
}

/// Why a certificate does not name a droplet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the certificate has no `{SAN_PREFIX}<uuid>` URI SAN")]
    NoDropletSan,
    #[error("the certificate names more than one droplet")]
    SeveralDroplets,
}

/// The droplet named by a DER certificate's URI SAN. Exactly one droplet SAN is required.
pub fn droplet_from_certificate(der: &[u8]) -> Result<DropletId, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let mut found = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name
            && let Some(id) = DropletId::from_san_uri(uri)
        {
            if found.is_some_and(|f| f != id) {
                return Err(IdentityError::SeveralDroplets);
            }
            found = Some(id);
        }
    }
    found.ok_or(IdentityError::NoDropletSan)
}

/// A certificate's validity period, as seconds since the Unix epoch: (notBefore, notAfter).
pub fn certificate_validity(der: &[u8]) -> Result<(i64, i64), IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let validity = cert.validity();
    Ok((validity.not_before.timestamp(), validity.not_after.timestamp()))
}

/// SHA-256 of a DER certificate, lowercase hex: the form of a CA pin.
pub fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_uri_round_trips() {
        let id = DropletId::new();
        assert_eq!(DropletId::from_san_uri(&id.san_uri()), Some(id));
    }

    #[test]
    fn other_uris_name_no_droplet() {
        assert_eq!(DropletId::from_san_uri("spiffe://flotilla/droplet/nope"), None);
        assert_eq!(DropletId::from_san_uri("spiffe://other/droplet/0a6f0e59-2a36-4c4e-9a4e-0d7b6c1d2e3f"), None);
        // Uppercase or simple forms are other spellings of the same id: refused.
        assert_eq!(DropletId::from_san_uri("spiffe://flotilla/droplet/0A6F0E59-2A36-4C4E-9A4E-0D7B6C1D2E3F"), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(droplet_from_certificate(b"nope"), Err(IdentityError::Malformed(_))));
    }
}
