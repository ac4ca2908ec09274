//! A droplet joins with a one-time token and the CA's pin, and nothing else. Every bad
//! token is refused with its own status, and a refusal changes nothing in the database.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use flotilla::{
    DropletId,
    proto::{DropletStatus, EnrollRequest, HostFacts, RevokeEnrollmentTokenRequest, enrollment_token::State},
};
use flotilla_agent::enroll::{self, Trust};
use tonic::Code;

use crate::helpers::{self, TestControlPlane, TestDb, csr, droplet_of, enroll_client, new_master_key, temp_dir};

const WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_droplet_made_from_a_token_alone_comes_online_and_keeps_its_certificate() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let created = cp.token(None).await?;
    let token = created.enrollment_token.clone().unwrap_or_default();
    let droplet: DropletId = token.droplet_id.parse()?;
    assert_eq!(token.state(), State::Usable);
    assert!(created.token.contains(&created.ca_sha256), "the token carries the CA pin");
    assert_eq!(cp.droplet(droplet).await?.status(), DropletStatus::Pending);

    let state_dir = temp_dir("flotilla-agent");
    let agent = cp.enrolling_agent(&state_dir, Some(&created.token));
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
    let identity = state_dir.join("identity.pem");
    assert_eq!(std::fs::metadata(&identity)?.permissions().mode() & 0o777, 0o600);
    assert_eq!(droplet_of(&std::fs::read_to_string(&identity)?)?, droplet);
    agent.stop().await?;

    // A later start reuses the certificate: the token (spent) is never needed again.
    let before = db.enrollment_state().await?;
    let agent = cp.enrolling_agent(&state_dir, Some(&created.token));
    helpers::wait_for("a second session", WITHIN, || async {
        let d = cp.droplet(droplet).await?;
        Ok(d.status() == DropletStatus::Online && d.disconnected_at.is_none())
    })
    .await?;
    assert_eq!(db.enrollment_state().await?, before, "no second enrollment while the certificate is valid");
    let listed = cp
        .fleet()
        .await?
        .list_enrollment_tokens(flotilla::proto::ListEnrollmentTokensRequest::default())
        .await?
        .into_inner();
    assert_eq!(listed.enrollment_tokens.len(), 1);
    assert_eq!(listed.enrollment_tokens[0].state(), State::Used);
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}

async fn enroll_with(cp: &TestControlPlane, token: &str) -> Result<flotilla::proto::EnrollResponse, tonic::Status> {
    let mut client = enroll_client(cp).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
    let request = EnrollRequest {
        token: token.into(),
        csr_pem: csr().map_err(|e| tonic::Status::internal(e.to_string()))?,
        host: Some(HostFacts::default()),
        agent_version: "test".into(),
    };
    client.enroll(request).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_each_with_its_status_and_change_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;

    // Malformed.
    let status = enroll_with(&cp, "not-a-token").await.expect_err("malformed");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("token:"), "{}", status.message());

    // Unknown: well formed, never issued.
    let real = cp.token(None).await?.token;
    let parts: Vec<&str> = real.split('-').collect();
    let unknown = format!("FLT1-{}-{}-{}", parts[1], uuid::Uuid::new_v4().simple(), "ab".repeat(32));
    assert_eq!(enroll_with(&cp, &unknown).await.expect_err("unknown").code(), Code::Unauthenticated);

    // A real id with the wrong secret is just as unknown.
    let wrong_secret = format!("FLT1-{}-{}-{}", parts[1], parts[2], "cd".repeat(32));
    assert_eq!(enroll_with(&cp, &wrong_secret).await.expect_err("wrong secret").code(), Code::Unauthenticated);

    // Expired.
    let expired = cp.token(None).await?;
    let expired_id: uuid::Uuid = expired.enrollment_token.clone().unwrap_or_default().id.parse()?;
    sqlx::query("UPDATE enrollment_tokens SET expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(expired_id)
        .execute(&db.pool)
        .await?;
    let status = enroll_with(&cp, &expired.token).await.expect_err("expired");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("expired"), "{}", status.message());

    // Revoked.
    let revoked = cp.token(None).await?;
    let revoked_id = revoked.enrollment_token.clone().unwrap_or_default().id;
    cp.fleet().await?.revoke_enrollment_token(RevokeEnrollmentTokenRequest { id: revoked_id }).await?;
    let status = enroll_with(&cp, &revoked.token).await.expect_err("revoked");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("revoked"), "{}", status.message());

    // None of these changed anything.
    assert_eq!(db.enrollment_state().await?, (0, 0));

    // Reuse: the first use works, the second is refused and changes nothing more.
    let response = enroll_with(&cp, &real).await?;
    assert!(!response.certificate_chain_pem.is_empty());
    assert_eq!(db.enrollment_state().await?, (1, 1));
    let status = enroll_with(&cp, &real).await.expect_err("reused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("already used"), "{}", status.message());
    assert_eq!(db.enrollment_state().await?, (1, 1));
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_asking_for_another_droplet_gets_a_certificate_for_the_tokens_droplet() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let created = cp.token(None).await?;
    let mine: DropletId = created.enrollment_token.clone().unwrap_or_default().droplet_id.parse()?;
    let theirs = DropletId::new();

    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["control-plane.example.com".to_owned()])?;
    params.subject_alt_names.push(rcgen::SanType::URI(theirs.san_uri().try_into()?));
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let request = EnrollRequest { token: created.token, csr_pem, ..Default::default() };
    let response = enroll_client(&cp).await?.enroll(request).await?.into_inner();
    assert_eq!(response.droplet_id, mine.to_string());
    assert_eq!(droplet_of(&response.certificate_chain_pem)?, mine);
    assert!(!response.certificate_chain_pem.contains("control-plane.example.com"));
    let owners: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT droplet_id FROM certificates").fetch_all(&db.pool).await?;
    assert_eq!(owners, [mine.as_uuid()]);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pinned_to_another_ca_sends_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let created = cp.token(None).await?;
    let other = flotilla_control_plane::identity::pki::Ca::generate("another fleet")?;

    let outcome =
        enroll::enroll(&cp.enroll_url(), &created.token, &Trust::Pin(other.sha256_pin()), HostFacts::default()).await;
    let Err(enroll::EnrollError::Unreachable(message)) = outcome else {
        anyhow::bail!("expected a refused TLS handshake, got {outcome:?}");
    };
    assert!(message.contains("does not match the pinned CA"), "{message}");
    // The handshake failed before any request: the token is still usable.
    assert_eq!(db.enrollment_state().await?, (0, 0));
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_spent_100_times_at_once_on_two_control_planes_enrolls_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let key = new_master_key();
    let one = TestControlPlane::builder(&db.pool).master_key(key.clone()).start().await?;
    let two = TestControlPlane::builder(&db.pool).master_key(key).start().await?;
    let token = one.token(None).await?.token;

    let mut calls = tokio::task::JoinSet::new();
    for n in 0..100 {
        let mut client = enroll_client(if n % 2 == 0 { &one } else { &two }).await?;
        let request = EnrollRequest { token: token.clone(), csr_pem: csr()?, ..Default::default() };
        calls.spawn(async move { client.enroll(request).await.map(|_| ()).map_err(|s| s.code()) });
    }
    let mut ok = 0;
    let mut refused = Vec::new();
    while let Some(outcome) = calls.join_next().await {
        match outcome? {
            Ok(()) => ok += 1,
            Err(code) => refused.push(code),
        }
    }
    assert_eq!(ok, 1, "exactly one enrollment succeeds");
    assert_eq!(refused.len(), 99);
    assert!(refused.iter().all(|c| *c == Code::PermissionDenied), "{refused:?}");
    assert_eq!(db.enrollment_state().await?, (1, 1));
    one.stop().await?;
    two.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_started_at_once_on_an_empty_database_make_one_ca() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let key = new_master_key();
    let validity = Duration::from_secs(3600);
    let (one, two) = tokio::join!(
        TestControlPlane::builder(&db.pool).master_key(key.clone()).cert_validity(validity).start(),
        TestControlPlane::builder(&db.pool).master_key(key).cert_validity(validity).start(),
    );
    let (one, two) = (one?, two?);
    let cas: i64 = sqlx::query_scalar("SELECT count(*) FROM certificate_authorities").fetch_one(&db.pool).await?;
    assert_eq!(cas, 1);
    let bundle = |cp: &TestControlPlane| std::fs::read_to_string(cp.data_dir.join("ca.crt"));
    assert_eq!(bundle(&one)?, bundle(&two)?, "both serve under the same CA");
    one.stop().await?;
    two.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_certificate_or_a_token_the_agent_says_what_to_do() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;

    // Nothing at all.
    let empty = temp_dir("flotilla-agent");
    let error = cp.enrolling_agent(&empty, None).ended(WITHIN).await?.expect_err("cannot start");
    assert!(format!("{error:#}").contains("token create"), "{error:#}");

    // A certificate that expired while the droplet was offline.
    let droplet = DropletId::new();
    let authorities = cp.authorities().await?;
    let now = time::OffsetDateTime::now_utc();
    let old =
        authorities.active.issue_agent(droplet, now - time::Duration::hours(25), now - time::Duration::hours(1))?;
    let dir = temp_dir("flotilla-agent");
    let store = flotilla_agent::identity::Store::new(&dir);
    store.save_bundle(&authorities.bundle)?;
    store.save_identity(&old.cert_pem, &old.key_pem)?;
    let error = cp.enrolling_agent(&dir, None).ended(WITHIN).await?.expect_err("expired");
    let text = format!("{error:#}");
    assert!(text.contains("expired") && text.contains(&format!("token create --droplet {droplet}")), "{text}");

    // ... and a spent token does not help: the refusal names the remedy. The first token
    // comes from the operator command the agent names (`token create --droplet`), which
    // also registers a droplet the database has never seen; the API answers NotFound for
    // an unknown id, as for another account's.
    let ca = &authorities.active;
    let spent =
        flotilla_control_plane::identity::enrollment::create(&db.pool, ca, "default", Some(droplet), "", WITHIN)
            .await?
            .token;
    enroll_with(&cp, &spent).await?;
    let error = cp.enrolling_agent(&dir, Some(&spent)).ended(WITHIN).await?.expect_err("spent token");
    assert!(format!("{error:#}").contains("already used"), "{error:#}");

    // A fresh token for the same droplet brings it back.
    let fresh = cp.token(Some(droplet)).await?.token;
    let agent = cp.enrolling_agent(&dir, Some(&fresh));
    cp.await_status(droplet, DropletStatus::Online, WITHIN).await?;
    agent.stop().await?;
    cp.stop().await?;
    Ok(())
}
