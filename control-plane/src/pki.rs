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
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// How far back certificates are dated, so a droplet whose clock runs a little behind
/// still accepts them.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate the CA issued, with the private key it was made for.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The serial number, as lowercase hex.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// The CA: its certificate and the key that signs with it.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("sha256", &self.sha256_pin())
            .finish_non_exhaustive()
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
        let cert = params
            .self_signed(&key)
            .context("signing the CA certificate")?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// A CA from its PEM certificate and PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("parsing the CA certificate")?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .context("the CA certificate file holds no certificate")?
            .context("reading the CA certificate")?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
        })
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let cert = read(&dir.join(CA_CERT))?;
        let key = read(&dir.join(CA_KEY))?;
        Self::from_pem(&cert, &key)
    }

    /// Loads the CA from `dir`, creating it there first if it has none. Returns whether it
    /// was created.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<(Self, bool)> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return Ok((Self::load(dir)?, false));
        }
        let ca = Self::generate("Flotilla fleet CA")?;
        ca.save(dir)?;
        Ok((ca, true))
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, refusing to overwrite a CA.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_new(
            &dir.join(CA_KEY),
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&dir.join(CA_CERT), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
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
        let mut params =
            CertificateParams::new(names.to_vec()).context("server certificate names")?;
        params.distinguished_name = name("Flotilla control plane");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        self.sign(params, now - BACKDATE, now + validity)
    }

    /// A client certificate naming one droplet, with a key made here. Used by the operator
    /// tool `ca issue-agent`; enrolled droplets make their own keys.
    pub fn issue_agent(
        &self,
        droplet: DropletId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("droplet {droplet}"));
        params.subject_alt_names = vec![SanType::URI(
            droplet.san_uri().try_into().context("droplet SAN")?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, not_before, not_after)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Issued> {
        let key = KeyPair::generate().context("generating a key")?;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.not_before = not_before;
        params.not_after = not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: hex::encode(serial.to_bytes()),
            not_after,
        })
    }
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

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
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
        let der = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes())
            .next()
            .context("no certificate")??;
        assert_eq!(
            flotilla::identity::droplet_from_certificate(&der),
            Ok(droplet)
        );
        Ok(())
    }

    #[test]
    fn a_saved_ca_loads_with_the_same_pin_and_is_not_overwritten() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("flotilla-pki-{}", uuid::Uuid::new_v4()));
        let (created, was_new) = Ca::load_or_create(&dir)?;
        assert!(was_new);
        let (loaded, was_new) = Ca::load_or_create(&dir)?;
        assert!(!was_new);
        assert_eq!(created.sha256_pin(), loaded.sha256_pin());
        assert!(
            Ca::generate("other")?.save(&dir).is_err(),
            "an existing CA must not be replaced"
        );
        let mode = fs::metadata(dir.join(CA_KEY))?.permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
