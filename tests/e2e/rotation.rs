//! Certificates are short-lived and renewed over the open session; CAs rotate without
//! cutting droplets off.

use std::time::Duration;

use flotilla::{DropletId, proto::DropletStatus};
use flotilla_control_plane::identity::pki::Authorities;

use crate::helpers::{TestControlPlane, TestDb, droplet_of, new_master_key, temp_dir, wait_for};

const WITHIN: Duration = Duration::from_secs(30);

async fn certificates_of(db: &TestDb, droplet: DropletId) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT serial FROM certificates WHERE droplet_id = $1 ORDER BY issued_at")
        .bind(droplet.as_uuid())
        .fetch_all(&db.pool)
        .await?)
}

fn stored_serial(dir: &std::path::Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(dir.join("identity.pem"))?;
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().ok_or_else(|| anyhow::anyhow!("no cert"))??;
    flotilla_control_plane::identity::pki::serial_of(&der).ok_or_else(|| anyhow::anyhow!("no serial"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_outlives_three_certificate_rotations_without_a_heartbeat_gap() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Certificates live 6 s (backdated 1.5 s, whole seconds): the agent renews at a random
    // 50-80% of that, 1.25-4.5 s after each is issued.
    let cp = TestControlPlane::builder(&db.pool).cert_validity(Duration::from_secs(6)).start().await?;
    let created = cp.token(None).await?;
    let droplet: DropletId = created.enrollment_token.clone().unwrap_or_default().droplet_id.parse()?;
    let dir = temp_dir("flotilla-agent");
    let agent = cp.enrolling_agent(&dir, Some(&created.token));
    let first = cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;

    // Watch every 20 ms while three renewals happen: a heartbeat gap of more than
    // 3 × 100 ms would turn the droplet unreachable, a new session would move connected_at.
    wait_for("three renewals", WITHIN, || async {
        let now = cp.droplet(droplet).await?;
        assert_eq!(now.status(), DropletStatus::Online, "a heartbeat gap during rotation");
        assert_eq!(now.connected_at, first.connected_at, "the session was replaced during rotation");
        Ok(certificates_of(&db, droplet).await?.len() >= 4)
    })
    .await?;

    let serials = certificates_of(&db, droplet).await?;
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM certificates WHERE droplet_id = $1 ORDER BY issued_at")
            .bind(droplet.as_uuid())
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(reasons[0], "enrollment");
    // Renewals are spread over the certificate's life, not fired back to back: each comes
    // at least 1 s after the one before.
    let issued: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT issued_at FROM certificates WHERE droplet_id = $1 ORDER BY issued_at")
            .bind(droplet.as_uuid())
            .fetch_all(&db.pool)
            .await?;
    for pair in issued.windows(2) {
        let gap = (pair[1] - pair[0]).to_std()?;
        assert!(gap >= Duration::from_secs(1), "renewed {gap:?} after the previous certificate");
    }
    assert!(reasons[1..].iter().all(|r| r == "renewal"), "{reasons:?}");
    // The newest certificate is the one on disk, for the next connection.
    wait_for("the renewed certificate on disk", WITHIN, || async {
        Ok(certificates_of(&db, droplet).await?.last() == Some(&stored_serial(&dir)?))
    })
    .await?;
    assert_eq!(droplet_of(&std::fs::read_to_string(dir.join("identity.pem"))?)?, droplet);
    assert!(serials.len() >= 4);

    // And the next connection uses it: restart the control plane, the agent reconnects
    // with the renewed certificate even though the first one has long expired.
    let cp = cp.restart().await?;
    wait_for("a new session with the renewed certificate", WITHIN, || async {
        let now = cp.droplet(droplet).await?;
        Ok(now.status() == DropletStatus::Online && now.connected_at != first.connected_at)
    })
    .await?;
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_reaches_agents_before_the_old_ca_is_retired() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let key = new_master_key();
    // Short certificates so the agent renews under the new CA during the test.
    let cp = TestControlPlane::builder(&db.pool)
        .master_key(key.clone())
        .cert_validity(Duration::from_secs(4))
        .start()
        .await?;
    let old_ca = cp.ca().await?.sha256_pin();
    let created = cp.token(None).await?;
    let droplet: DropletId = created.enrollment_token.clone().unwrap_or_default().droplet_id.parse()?;
    let dir = temp_dir("flotilla-agent");
    let agent = cp.enrolling_agent(&dir, Some(&created.token));
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
    let bundle_size = || -> anyhow::Result<usize> {
        let pem = std::fs::read_to_string(dir.join("ca.crt"))?;
        Ok(rustls_pemfile::certs(&mut pem.as_bytes()).count())
    };
    assert_eq!(bundle_size()?, 1);

    // 1. Stage: after a restart, Welcome carries both CAs and the agent keeps them.
    Authorities::stage_next(&db.pool, &key).await?;
    let cp = cp.restart().await?;
    wait_for("the agent to hold both CAs", WITHIN, || async { Ok(bundle_size()? == 2) }).await?;

    // 2. Activate: the control plane now presents a certificate from the new CA, which
    // the agent trusts already; renewals come from the new CA.
    Authorities::activate_next(&db.pool).await?;
    let cp = cp.restart().await?;
    let new_ca = cp.ca().await?;
    assert_ne!(new_ca.sha256_pin(), old_ca);
    wait_for("a certificate from the new CA on disk", WITHIN, || async {
        let serial = stored_serial(&dir)?;
        let ca: Option<uuid::Uuid> = sqlx::query_scalar("SELECT ca_id FROM certificates WHERE serial = $1")
            .bind(&serial)
            .fetch_optional(&db.pool)
            .await?;
        Ok(ca == Some(new_ca.id) && cp.droplet(droplet).await?.status() == DropletStatus::Online)
    })
    .await?;

    // 3. Retire the old CA: the droplet connects on with its new-CA certificate.
    Authorities::retire(&db.pool).await?;
    let connected_before = cp.droplet(droplet).await?.connected_at;
    let cp = cp.restart().await?;
    wait_for("a session after retiring the old CA", WITHIN, || async {
        let now = cp.droplet(droplet).await?;
        Ok(now.status() == DropletStatus::Online && now.connected_at != connected_before)
    })
    .await?;
    assert_eq!(cp.authorities().await?.bundle.len(), 1);
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
