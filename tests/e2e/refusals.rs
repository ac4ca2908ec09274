//! The agent port refuses, at the TLS handshake, every connection without a client
//! certificate from the fleet CA that names a droplet, and refuses incompatible agents
//! with a `Goodbye` naming the version to run. None of them leaves a row.

use std::time::Duration;

use flotilla::{
    DropletId,
    proto::{ProtocolVersion, control_message, goodbye::Reason},
};
use flotilla_control_plane::identity::pki::Ca;
use rustls::AlertDescription;
use time::OffsetDateTime;

use crate::helpers::{self, TestControlPlane, TestDb, hello};

/// Dials the agent port with `client` (a certificate and key, or none), trusting the real
/// CA, and returns how the server ended the connection.
async fn handshake(
    cp: &TestControlPlane,
    client: Option<(String, String)>,
) -> anyhow::Result<Result<(), rustls::Error>> {
    let ca = cp.ca().await?;
    helpers::tls_verdict(cp, ca.cert_pem(), client.as_ref().map(|(c, k)| (c.as_str(), k.as_str()))).await
}

async fn assert_no_rows(db: &TestDb) -> anyhow::Result<()> {
    assert_eq!(db.droplet_count().await?, 0, "a refused connection must leave no droplet row");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let other = Ca::generate("someone else's CA")?;
    let now = OffsetDateTime::now_utc();
    let issued =
        other.issue_agent(DropletId::new(), now - time::Duration::minutes(1), now + time::Duration::hours(1))?;

    let outcome = handshake(&cp, Some((issued.cert_pem, issued.key_pem))).await?;
    assert_eq!(outcome, Err(rustls::Error::AlertReceived(AlertDescription::UnknownCA)));
    assert_no_rows(&db).await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_at_the_handshake() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let now = OffsetDateTime::now_utc();
    let issued =
        cp.ca().await?.issue_agent(DropletId::new(), now - time::Duration::hours(2), now - time::Duration::hours(1))?;

    let outcome = handshake(&cp, Some((issued.cert_pem, issued.key_pem))).await?;
    assert_eq!(outcome, Err(rustls::Error::AlertReceived(AlertDescription::CertificateExpired)));
    assert_no_rows(&db).await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_at_all_is_refused_at_the_handshake() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;

    let outcome = handshake(&cp, None).await?;
    assert_eq!(outcome, Err(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)));
    assert_no_rows(&db).await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_no_droplet_is_closed_before_any_request() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    // Chains to the right CA, but is a server certificate with DNS names only.
    let issued = cp.ca().await?.issue_server(&["localhost".into()], Duration::from_secs(3600))?;

    let outcome = handshake(&cp, Some((issued.cert_pem, issued.key_pem))).await?;
    // Either the verifier refuses the wrong key usage, or the acceptor closes the connection
    // for the missing droplet SAN: never an HTTP/2 answer.
    assert!(outcome.is_err(), "the connection must not be served: {outcome:?}");
    assert_no_rows(&db).await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_completes_the_handshake() -> anyhow::Result<()> {
    // The control for the refusals above: the same probe succeeds with good credentials.
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let creds = cp.credentials(DropletId::new()).await?;
    let outcome = handshake(&cp, Some((creds.cert_pem, creds.key_pem))).await?;
    assert_eq!(outcome, Ok(()));
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_two_minor_versions_away_gets_a_goodbye_naming_the_version_to_run() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let ours = flotilla::protocol::CURRENT;
    for theirs in [
        ProtocolVersion { major: ours.major + 1, minor: 0 },
        ProtocolVersion { major: ours.major, minor: ours.minor + 2 },
    ] {
        let mut old = hello();
        old.protocol = Some(theirs);
        let mut session = cp.raw_session(DropletId::new(), old).await?;
        let message = session.next().await?;
        let Some(control_message::Kind::Goodbye(goodbye)) = message.kind else {
            anyhow::bail!("expected Goodbye, got {message:?}");
        };
        assert_eq!(goodbye.reason(), Reason::IncompatibleProtocol);
        assert_eq!(goodbye.required_protocol, Some(ours));
        assert!(goodbye.message.contains(&ours.to_string()), "{}", goodbye.message);
    }
    assert_no_rows(&db).await?;
    cp.stop().await?;
    Ok(())
}
