//! Revocation takes effect at once and everywhere: the live session closes, and every
//! later handshake with that certificate is refused, on every control plane.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{DeleteDropletRequest, control_message, goodbye::Reason},
};
use rustls::AlertDescription;
use tonic::Code;

use crate::helpers::{self, RawSession, TestControlPlane, TestDb, hello, new_master_key};

async fn handshake(
    cp: &TestControlPlane,
    creds: &flotilla_agent::Credentials,
) -> anyhow::Result<Result<(), rustls::Error>> {
    helpers::tls_verdict(cp, &creds.ca_pem, Some((&creds.cert_pem, &creds.key_pem))).await
}

async fn expect_revoked_goodbye(session: &mut RawSession) -> anyhow::Result<()> {
    loop {
        let message = session.next().await?;
        match message.kind {
            Some(control_message::Kind::Goodbye(goodbye)) => {
                assert_eq!(goodbye.reason(), Reason::Revoked, "{goodbye:?}");
                return Ok(());
            }
            Some(control_message::Kind::Welcome(_)) => continue,
            other => anyhow::bail!("expected Goodbye, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_droplet_closes_its_session_and_refuses_its_certificate() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let droplet = DropletId::new();
    let creds = cp.credentials(droplet).await?;
    assert_eq!(handshake(&cp, &creds).await?, Ok(()), "the certificate works before");
    let mut session = cp.raw_session_with(&creds, hello()).await?;
    session.next().await?; // Welcome

    let deleted =
        cp.fleet().await?.delete_droplet(DeleteDropletRequest { id: droplet.to_string() }).await?.into_inner();
    assert_eq!(deleted.revoked_certificate_serials.len(), 1);
    expect_revoked_goodbye(&mut session).await?;
    assert_eq!(handshake(&cp, &creds).await?, Err(rustls::Error::AlertReceived(AlertDescription::CertificateRevoked)));

    let status = cp.droplet(droplet).await.expect_err("gone").downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(db.droplet_count().await?, 0, "the revoked certificate did not bring the droplet back");
    let status = cp
        .fleet()
        .await?
        .delete_droplet(DeleteDropletRequest { id: droplet.to_string() })
        .await
        .expect_err("deleting twice");
    assert_eq!(status.code(), Code::NotFound);
    drop(session);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_cut_off_on_every_control_plane() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let key = new_master_key();
    let validity = Duration::from_secs(3600);
    let one = TestControlPlane::builder(&db.pool).master_key(key.clone()).cert_validity(validity).start().await?;
    let two = TestControlPlane::builder(&db.pool).master_key(key).cert_validity(validity).start().await?;
    let droplet = DropletId::new();
    let creds = one.credentials(droplet).await?;
    let mut session = one.raw_session_with(&creds, hello()).await?;
    session.next().await?;
    // Another certificate of the same droplet stays good: revocation is per serial.
    let other = one.credentials(droplet).await?;

    // Revoked by serial through another control plane's database connection.
    let serial: String =
        sqlx::query_scalar("SELECT serial FROM certificates ORDER BY issued_at LIMIT 1").fetch_one(&db.pool).await?;
    let mut conn = db.pool.acquire().await?;
    let revoked = flotilla_control_plane::store::revoke_certificates(
        &mut conn,
        &flotilla_control_plane::store::Revoke::Serial(serial.clone()),
    )
    .await?;
    assert_eq!(revoked.len(), 1);

    expect_revoked_goodbye(&mut session).await?;
    let refused = Err(rustls::Error::AlertReceived(AlertDescription::CertificateRevoked));
    helpers::wait_for("both control planes to refuse the certificate", Duration::from_secs(10), || async {
        Ok(handshake(&one, &creds).await? == refused && handshake(&two, &creds).await? == refused)
    })
    .await?;
    assert_eq!(handshake(&two, &other).await?, Ok(()));
    drop(session);
    one.stop().await?;
    two.stop().await?;
    Ok(())
}
