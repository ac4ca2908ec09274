//! Revocation that takes effect at once, in every control-plane process.
//!
//! PostgreSQL is the source of truth (`certificates.revoked_at`). Each process caches the
//! revoked serials in memory and learns of new ones through `LISTEN/NOTIFY` (ids only), so a
//! handshake never queries the database. On a notification the process also closes any
//! session running on that certificate. If the listening connection drops, notifications
//! may be lost, so the whole set is read again when it comes back.

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
};

use flotilla::DropletId;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    identity::pki::serial_of,
    store,
    store::notify::{Heard, hear, listen},
};

/// The revoked serials this process knows of. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    // std RwLock: read on every handshake, never held across an await.
    serials: Arc<RwLock<HashSet<String>>>,
}

impl Revocations {
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }

    fn insert(&self, serial: String) {
        self.serials.write().unwrap_or_else(|p| p.into_inner()).insert(serial);
    }

    fn replace(&self, serials: HashSet<String>) {
        *self.serials.write().unwrap_or_else(|p| p.into_inner()) = serials;
    }

    /// Reads every revoked, unexpired serial from the database.
    pub async fn reload(&self, db: &PgPool) -> sqlx::Result<usize> {
        let serials: HashSet<String> = store::revoked_serials(db).await?.into_iter().collect();
        let n = serials.len();
        self.replace(serials);
        Ok(n)
    }
}

/// Listens for revocations until `stop`; `close` ends the session of each revoked
/// certificate (droplet and serial) if this process holds it, and says whether it did.
pub async fn spawn_listener(
    db: PgPool,
    revocations: Revocations,
    close: impl Fn(DropletId, &str) -> bool + Send + 'static,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> sqlx::Result<()> {
    let mut listener = listen(&db, &[store::REVOCATIONS_CHANNEL]).await?;
    // Listening first, then reading: nothing revoked in between is missed.
    revocations.reload(&db).await?;
    tasks.spawn(async move {
        while let Some(heard) = hear(&mut listener, &stop, "revocation").await {
            match heard {
                Heard::Notification(notification) => {
                    let Some((serial, droplet)) = notification.payload().split_once(':') else { continue };
                    revocations.insert(serial.to_owned());
                    if let Ok(droplet) = droplet.parse::<DropletId>()
                        && close(droplet, serial)
                    {
                        tracing::info!(droplet_id = %droplet, %serial, "closed the session of a revoked certificate");
                    }
                }
                Heard::Lost => {
                    if let Err(error) = revocations.reload(&db).await {
                        tracing::error!(%error, "could not reload revocations");
                    }
                }
            }
        }
    });
    Ok(())
}

/// The chain check of `inner`, then the revocation check.
#[derive(Debug)]
pub struct RevocationAwareVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub revocations: Revocations,
}

impl ClientCertVerifier for RevocationAwareVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match serial_of(end_entity) {
            Some(serial) if self.revocations.is_revoked(&serial) => {
                Err(Error::InvalidCertificate(CertificateError::Revoked))
            }
            Some(_) => Ok(verified),
            None => Err(Error::InvalidCertificate(CertificateError::BadEncoding)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
