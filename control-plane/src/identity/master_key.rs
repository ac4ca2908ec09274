//! The master key: it encrypts the CA's private key at rest in PostgreSQL, so a copy of
//! the database alone does not let anyone sign for the fleet.
//!
//! Read from `FLOTILLA_MASTER_KEY` (32 bytes, base64 or hex), or from a key file that is
//! created on first use (mode 0600) — fine for one process or a shared mounted secret.
//! Sealed values are `nonce (12 bytes) ‖ ChaCha20-Poly1305 ciphertext`.

use std::{fs, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const KEY_LEN: usize = 32;

pub struct MasterKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("the master key must be 32 bytes, as 64 hex digits or base64")]
    Malformed,
    #[error("the sealed value is damaged, or was sealed with another master key")]
    WrongKeyOrDamaged,
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MasterKeyError> {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| MasterKeyError::Malformed)?;
        Ok(Self { key: LessSafeKey::new(key) })
    }

    /// Parses 64 hex digits or base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, MasterKeyError> {
        let text = text.trim();
        let bytes = hex::decode(text)
            .ok()
            .filter(|b| b.len() == KEY_LEN)
            .or_else(|| STANDARD.decode(text).ok().filter(|b| b.len() == KEY_LEN))
            .ok_or(MasterKeyError::Malformed)?;
        Self::from_bytes(&bytes)
    }

    /// Reads the key file, creating it with a fresh random key if it does not exist.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("reading the master key {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                let bytes: [u8; KEY_LEN] = rand::random();
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("creating the master key {}", path.display()))?;
                file.write_all(hex::encode(bytes).as_bytes())?;
                file.sync_all()?;
                tracing::info!(path = %path.display(), "created a master key: back it up with the database");
                Ok(Self::from_bytes(&bytes)?)
            }
            Err(e) => Err(e).with_context(|| format!("reading the master key {}", path.display())),
        }
    }

    /// Encrypts `plaintext`; `context` binds it to its purpose (it must match on `open`).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut sealed = plaintext.to_vec();
        // Sealing fails only for plaintexts beyond ChaCha20's 256 GiB limit.
        #[allow(clippy::expect_used)]
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(context), &mut sealed)
            .expect("a CA key is far below the AEAD size limit");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, MasterKeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(MasterKeyError::WrongKeyOrDamaged);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| MasterKeyError::WrongKeyOrDamaged)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut buffer)
            .map_err(|_| MasterKeyError::WrongKeyOrDamaged)?;
        Ok(plaintext.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() -> anyhow::Result<()> {
        let key = MasterKey::parse(&hex::encode([7u8; 32]))?;
        let sealed = key.seal(b"ca", b"secret key");
        assert!(!sealed.windows(10).any(|w| w == b"secret key"));
        assert_eq!(key.open(b"ca", &sealed)?, b"secret key");
        assert!(key.open(b"other", &sealed).is_err());
        let other = MasterKey::parse(&STANDARD.encode([8u8; 32]))?;
        assert!(matches!(other.open(b"ca", &sealed), Err(MasterKeyError::WrongKeyOrDamaged)));
        Ok(())
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in ["", "abc", &hex::encode([1u8; 16]), "not base64 at all!"] {
            assert!(matches!(MasterKey::parse(bad), Err(MasterKeyError::Malformed)), "{bad}");
        }
    }
}
