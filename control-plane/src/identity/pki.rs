//! The fleet's certificate authority: it signs the control plane's server certificates
//! and every droplet's client certificate.
//!
//! Until enrollment lands the CA lives in the data directory (`ca.crt`, `ca.key`, the key
//! with mode 0600), which is fine for a single control-plane process or a shared mounted
//! secret.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use flotilla::DropletId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{identity::master_key::MasterKey, store};
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

/// Serialises CA creation and rotation across every control-plane process.
const CA_LOCK: i64 = 0x666c_6f74_696c_6c61; // "flotilla"
/// How far back certificates are dated, so a droplet whose clock runs a little behind
/// still accepts them.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// How far to backdate a certificate valid for `validity`: `BACKDATE`, but at most a
/// quarter of the validity, so that renewing at 50-80% of notBefore..notAfter still
/// means 50-80% of the time the certificate is actually in use, even for the
/// seconds-long certificates of tests.
pub fn backdate_for(validity: Duration) -> Duration {
    BACKDATE.min(validity / 4)
}

/// A certificate the CA issued, with the private key it was made for.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The serial number, as lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A CA: its certificate and the key that signs with it.
pub struct Ca {
    pub id: Uuid,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca").field("sha256", &self.sha256_pin()).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA, valid for ten years.
    pub fn generate(common_name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).context("signing the CA certificate")?;
        Self::from_pem(Uuid::new_v4(), &cert.pem(), &key.serialize_pem())
    }

    /// A CA from its PEM certificate and PEM private key.
    pub fn from_pem(id: Uuid, cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).context("parsing the CA certificate")?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .context("the CA certificate file holds no certificate")?
            .context("reading the CA certificate")?;
        Ok(Self { id, issuer, cert_pem: cert_pem.to_owned(), cert_der })
    }

    /// The private key, PEM. Only for sealing it with the master key.
    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex: the pin a droplet is given.
    pub fn sha256_pin(&self) -> String {
        hex::encode(Sha256::digest(self.cert_der.as_ref()))
    }

    /// A server certificate for the control plane's listeners, naming `names` (DNS names
    /// or IP addresses).
    pub fn issue_server(&self, names: &[String], validity: Duration) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(names.to_vec()).context("server certificate names")?;
        params.distinguished_name = name("Flotilla control plane");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().context("generating a key")?;
        let mut issued = self.sign(params, &key, now - BACKDATE, now + validity)?;
        issued.key_pem = key.serialize_pem();
        Ok(issued)
    }

    /// A client certificate naming one droplet, with a key made here. Used by the operator
    /// tool `ca issue-agent` and by tests; enrolled droplets make their own keys.
    pub fn issue_agent(
        &self,
        droplet: DropletId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Issued> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut issued = self.sign(agent_params(droplet)?, &key, not_before, not_after)?;
        issued.key_pem = key.serialize_pem();
        Ok(issued)
    }

    /// Signs a droplet's certificate signing request. Only the CSR's public key is used:
    /// whatever subject or names it asks for, the certificate names `droplet` alone.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        droplet: DropletId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CsrError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CsrError::Invalid(e.to_string()))?;
        let params = agent_params(droplet).map_err(|e| CsrError::Signing(e.to_string()))?;
        self.sign(params, &csr.public_key, not_before, not_after).map_err(|e| CsrError::Signing(e.to_string()))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Issued> {
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.not_before = not_before;
        params.not_after = not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer).context("signing a certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: String::new(),
            serial: hex::encode(serial.to_bytes()),
            not_before,
            not_after,
        })
    }
}

/// Every CA in service, as read from PostgreSQL at start-up.
pub struct Authorities {
    /// The CA that signs.
    pub active: Ca,
    /// Every CA to trust, PEM: the active one, a staged next one, a retiring one.
    pub bundle: Vec<String>,
    /// The DER of the same, for verifying client certificates.
    pub trusted: Vec<CertificateDer<'static>>,
}

fn key_context(id: Uuid) -> Vec<u8> {
    [b"flotilla/ca-key/".as_slice(), id.as_bytes()].concat()
}

fn open_ca(row: &store::AuthorityRow, master: &MasterKey) -> anyhow::Result<Ca> {
    let key = master.open(&key_context(row.id), &row.key_ciphertext).with_context(|| {
        format!("decrypting the key of CA {}: is this the master key the fleet was created with?", row.id)
    })?;
    let key = String::from_utf8(key).context("the CA key is not PEM")?;
    Ca::from_pem(row.id, &row.cert_pem, &key)
}

async fn insert_ca(conn: &mut sqlx::PgConnection, master: &MasterKey, state: &str) -> anyhow::Result<Ca> {
    let ca = Ca::generate("Flotilla fleet CA")?;
    let sealed = master.seal(&key_context(ca.id), ca.key_pem().as_bytes());
    store::insert_authority(conn, ca.id, ca.cert_pem(), &ca.sha256_pin(), &sealed, state).await?;
    Ok(ca)
}

impl Authorities {
    /// Reads the fleet's CAs, creating the first one if there is none. Every process that
    /// starts at once on an empty database ends up with the same single CA.
    pub async fn load_or_create(db: &PgPool, master: &MasterKey) -> anyhow::Result<(Self, bool)> {
        let mut tx = db.begin().await?;
        store::advisory_lock(&mut tx, CA_LOCK).await?;
        let mut rows = store::authorities_in_service(&mut tx).await?;
        let created = !rows.iter().any(|r| r.state == "active");
        if created {
            insert_ca(&mut tx, master, "active").await?;
            rows = store::authorities_in_service(&mut tx).await?;
        }
        tx.commit().await?;
        let active_row = rows.iter().find(|r| r.state == "active").context("no active CA")?;
        let active = open_ca(active_row, master)?;
        let bundle: Vec<String> = rows.iter().map(|r| r.cert_pem.clone()).collect();
        let trusted = bundle
            .iter()
            .flat_map(|pem| rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Vec<_>>())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the trust bundle")?;
        Ok((Self { active, bundle, trusted }, created))
    }

    /// Stages a new CA: trusted from the next start of each control plane, not yet signing.
    pub async fn stage_next(db: &PgPool, master: &MasterKey) -> anyhow::Result<Uuid> {
        let mut tx = db.begin().await?;
        store::advisory_lock(&mut tx, CA_LOCK).await?;
        if store::authorities_in_service(&mut tx).await?.iter().any(|r| r.state == "next") {
            anyhow::bail!("a next CA is already staged: activate it (`ca activate`) first");
        }
        let ca = insert_ca(&mut tx, master, "next").await?;
        tx.commit().await?;
        Ok(ca.id)
    }

    /// Makes the staged CA the signing one; the old one keeps being trusted (retiring).
    pub async fn activate_next(db: &PgPool) -> anyhow::Result<Uuid> {
        let mut tx = db.begin().await?;
        store::advisory_lock(&mut tx, CA_LOCK).await?;
        let rows = store::authorities_in_service(&mut tx).await?;
        let next = rows.iter().find(|r| r.state == "next").context("no CA is staged: run `ca stage` first")?;
        store::set_authority_state(&mut tx, "active", "retiring").await?;
        store::set_authority_state(&mut tx, "next", "active").await?;
        tx.commit().await?;
        Ok(next.id)
    }

    /// Stops trusting the retiring CA. Droplets still holding its certificates are cut off.
    pub async fn retire(db: &PgPool) -> anyhow::Result<Option<Uuid>> {
        let mut tx = db.begin().await?;
        store::advisory_lock(&mut tx, CA_LOCK).await?;
        let retiring = store::authorities_in_service(&mut tx).await?.into_iter().find(|r| r.state == "retiring");
        store::set_authority_state(&mut tx, "retiring", "retired").await?;
        tx.commit().await?;
        Ok(retiring.map(|r| r.id))
    }
}

/// Writes the trust bundle (every CA in service) as `ca.crt` into `dir`.
pub fn write_bundle(dir: &Path, bundle: &[String]) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("ca.crt");
    write_replace(&path, bundle.concat().as_bytes(), 0o644)?;
    Ok(path)
}

/// Writes a certificate and key as `<stem>.crt` and `<stem>.key` (mode 0600) into `dir`,
/// replacing any earlier ones.
pub fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> anyhow::Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    write_replace(&key, issued.key_pem.as_bytes(), 0o600)?;
    write_replace(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    Ok((cert, key))
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("csr_pem: not a valid, self-signed PKCS#10 request: {0}")]
    Invalid(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

fn agent_params(droplet: DropletId) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("droplet {droplet}"));
    params.subject_alt_names = vec![SanType::URI(droplet.san_uri().try_into().context("droplet SAN")?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// The serial number of a DER certificate, as lowercase hex (as `Issued::serial`).
pub fn serial_of(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 128 random bits, top bit clear so the DER integer stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", path.display()))
}

/// Writes to a temporary file and renames it over `path`, so a crash leaves the old file
/// or the new one, never half of one.
fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificates_name_their_droplet() -> anyhow::Result<()> {
        let ca = Ca::generate("test")?;
        let droplet = DropletId::new();
        let now = OffsetDateTime::now_utc();
        let issued = ca.issue_agent(droplet, now, now + time::Duration::hours(1))?;
        let der = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes()).next().context("no certificate")??;
        assert_eq!(flotilla::identity::droplet_from_certificate(&der), Ok(droplet));
        Ok(())
    }

    #[test]
    fn a_csr_asking_for_another_droplet_gets_a_certificate_naming_only_the_given_one() -> anyhow::Result<()> {
        let ca = Ca::generate("test")?;
        let (mine, theirs) = (DropletId::new(), DropletId::new());
        let key = KeyPair::generate()?;
        let mut asked = CertificateParams::new(vec!["evil.example.com".to_owned()])?;
        asked.subject_alt_names.push(SanType::URI(theirs.san_uri().try_into()?));
        asked.distinguished_name = name(&format!("droplet {theirs}"));
        let csr = asked.serialize_request(&key)?.pem()?;
        let now = OffsetDateTime::now_utc();
        let issued = ca.sign_csr(&csr, mine, now, now + time::Duration::hours(1))?;
        let der = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes()).next().context("no certificate")??;
        assert_eq!(flotilla::identity::droplet_from_certificate(&der), Ok(mine));
        assert!(!issued.cert_pem.is_empty() && issued.key_pem.is_empty(), "the key stays with the droplet");
        assert_eq!(serial_of(&der), Some(issued.serial));
        Ok(())
    }

    #[test]
    fn garbage_is_not_a_csr() -> anyhow::Result<()> {
        let ca = Ca::generate("test")?;
        let now = OffsetDateTime::now_utc();
        let refused = ca.sign_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            DropletId::new(),
            now,
            now,
        );
        assert!(matches!(refused, Err(CsrError::Invalid(_))));
        Ok(())
    }
}
