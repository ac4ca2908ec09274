//! The droplet's credentials ([`Credentials`], and [`Held`]: what they say about the
//! droplet), and where they are kept in the agent's state dir:
//!
//! - `identity.pem`: the certificate (leaf first) followed by its private key, mode 0600,
//!   replaced atomically (write, fsync, rename) so a crash leaves the old pair or the new
//!   one, never a certificate with the wrong key;
//! - `ca.crt`: the trust bundle, every CA the control plane said to trust.
//!
//! `agent.crt` + `agent.key` (as written by `flotilla-control-plane ca issue-agent`) are
//! read when there is no `identity.pem`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use flotilla::{DropletId, identity};

/// The agent's credentials: its certificate and key, and the CA it trusts (PEM).
#[derive(Clone)]
pub struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// Credentials with what the agent needs to know about them.
#[derive(Clone, Debug)]
pub struct Held {
    pub credentials: Credentials,
    pub droplet: DropletId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Held {
    pub fn from_credentials(credentials: Credentials) -> anyhow::Result<Self> {
        let der = first_cert(&credentials.cert_pem)?;
        let droplet = identity::droplet_from_certificate(&der).context("the certificate names no droplet")?;
        let (not_before, not_after) = identity::certificate_validity(&der)?;
        let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        Ok(Self { credentials, droplet, not_before: at(not_before), not_after: at(not_after) })
    }

    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

pub fn first_cert(pem: &str) -> anyhow::Result<Vec<u8>> {
    Ok(rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .context("no certificate in the PEM")?
        .context("reading the certificate PEM")?
        .to_vec())
}

/// The state dir's credential files.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The stored credentials, if any.
    pub fn load(&self) -> anyhow::Result<Option<Held>> {
        let Some(bundle) = read_optional(&self.path("ca.crt"))? else { return Ok(None) };
        let (cert_pem, key_pem) = match read_optional(&self.path("identity.pem"))? {
            Some(identity) => (identity.clone(), identity),
            None => match (read_optional(&self.path("agent.crt"))?, read_optional(&self.path("agent.key"))?) {
                (Some(cert), Some(key)) => (cert, key),
                _ => return Ok(None),
            },
        };
        let credentials = Credentials { cert_pem: certs_only(&cert_pem)?, key_pem, ca_pem: bundle };
        Held::from_credentials(credentials).map(Some)
    }

    /// Replaces the stored certificate and key together.
    pub fn save_identity(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let mut both = cert_pem.trim_end().to_owned();
        both.push('\n');
        both.push_str(key_pem);
        write_atomic(&self.path("identity.pem"), both.as_bytes(), 0o600)
    }

    pub fn save_bundle(&self, bundle: &[String]) -> anyhow::Result<()> {
        anyhow::ensure!(!bundle.is_empty(), "the control plane sent an empty trust bundle");
        write_atomic(&self.path("ca.crt"), bundle.concat().as_bytes(), 0o644)
    }
}

/// Only the certificates of a PEM that may also hold a key.
fn certs_only(pem: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut inside = false;
    for line in pem.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE-----") {
            inside = true;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
        if line.starts_with("-----END CERTIFICATE-----") {
            inside = false;
        }
    }
    anyhow::ensure!(!out.is_empty(), "no certificate in the identity file");
    Ok(out)
}

fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("a file in a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_files_are_private_and_replaced_whole() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("flotilla-identity-{}", uuid::Uuid::new_v4()));
        let store = Store::new(&dir);
        store.save_identity("-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n", "KEY1")?;
        store.save_identity("-----BEGIN CERTIFICATE-----\nBB\n-----END CERTIFICATE-----\n", "KEY2")?;
        let text = fs::read_to_string(dir.join("identity.pem"))?;
        assert!(text.contains("BB") && text.ends_with("KEY2") && !text.contains("KEY1"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dir.join("identity.pem"))?.permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.join("identity.tmp").exists());
        assert_eq!(certs_only(&text)?, "-----BEGIN CERTIFICATE-----\nBB\n-----END CERTIFICATE-----\n");
        fs::remove_dir_all(dir)?;
        Ok(())
    }
}
