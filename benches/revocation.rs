//! How long from revoking a certificate to its live session being closed: the revoke
//! commits (with its NOTIFY), the control plane's listener hears it, updates its cache and
//! sends `Goodbye` down the session. Real PostgreSQL, TLS and gRPC, all on this machine.
//!
//!     scripts/bench.sh revocation        # starts a throwaway PostgreSQL, then runs this

/// The end-to-end tests' helpers (tests/e2e/helpers.rs and tests/e2e/helpers/), of which a
/// benchmark uses a part.
#[path = "../tests/e2e"]
#[allow(dead_code)]
mod e2e {
    pub mod helpers;
}

use std::time::{Duration, Instant};

use e2e::helpers::{TestControlPlane, TestDb, hello, new_master_key, percentile};
use flotilla::{
    DropletId,
    proto::{control_message, goodbye::Reason},
};
use flotilla_control_plane::store::{self, Revoke};

const ROUNDS: usize = 200;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let key = new_master_key();
    let validity = Duration::from_secs(3600);
    // The session lives on one control plane; the revocation is committed through another
    // connection, as `flotilla-control-plane cert revoke` or another replica would.
    let owner = TestControlPlane::builder(&db.pool).master_key(key.clone()).cert_validity(validity).start().await?;
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let droplet = DropletId::new();
        let creds = owner.credentials(droplet).await?;
        let mut session = owner.raw_session_with(&creds, hello()).await?;
        session.next().await?; // Welcome
        let mut conn = db.pool.acquire().await?;
        let started = Instant::now();
        store::revoke_certificates(&mut conn, &Revoke::Droplet(droplet.as_uuid())).await?;
        let message = session.next().await?;
        let elapsed = started.elapsed();
        match message.kind {
            Some(control_message::Kind::Goodbye(goodbye)) if goodbye.reason() == Reason::Revoked => {}
            other => anyhow::bail!("expected a revocation Goodbye, got {other:?}"),
        }
        samples.push(elapsed);
    }
    samples.sort();
    println!(
        "revoke → session closed, {ROUNDS} rounds: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
    owner.stop().await?;
    Ok(())
}
