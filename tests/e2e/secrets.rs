//! Secrets stay secret: the enrollment token, the droplet's private key and the master
//! key never appear in any log line (captured here at TRACE level, every crate), and the
//! private key never reaches the control plane's database.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla::{DropletId, proto::DropletStatus};
use flotilla_control_plane::identity::master_key::MasterKey;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter, prelude::*};

use crate::helpers::{TestControlPlane, TestDb, alone, temp_dir, wait_for};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The base64 body lines of a PEM block, long enough to be unmistakable.
fn pem_body_lines(pem: &str, label: &str) -> Vec<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).map(|i| i + begin.len()).unwrap_or(pem.len());
    let stop = pem[start..].find(&end).map(|i| start + i).unwrap_or(start);
    pem[start..stop].lines().map(str::trim).filter(|l| l.len() >= 32).map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_key_appears_in_trace_logs_or_reaches_the_database() -> anyhow::Result<()> {
    // The capture is the global subscriber: in a process where no other test set one.
    if !alone("secrets::no_token_or_key_appears_in_trace_logs_or_reaches_the_database").await? {
        return Ok(());
    }
    let capture = Capture::default();
    tracing_subscriber::registry()
        .with(EnvFilter::new("trace"))
        .with(tracing_subscriber::fmt::layer().with_writer(capture.clone()).with_ansi(false))
        .try_init()?;

    let db = TestDb::new().await?;
    let master_bytes: [u8; 32] = rand::random();
    let master = Arc::new(MasterKey::from_bytes(&master_bytes)?);
    // Short certificates, so a renewal (a second CSR) happens too.
    let cp =
        TestControlPlane::builder(&db.pool).master_key(master).cert_validity(Duration::from_secs(6)).start().await?;
    let created = cp.token(None).await?;
    let droplet: DropletId = created.enrollment_token.clone().unwrap_or_default().droplet_id.parse()?;
    let dir = temp_dir("flotilla-agent");
    let agent = cp.enrolling_agent(&dir, Some(&created.token));
    cp.await_status(droplet, DropletStatus::Online, Duration::from_secs(20)).await?;
    wait_for("a renewal", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM certificates WHERE reason = 'renewal'")
            .fetch_one(&db.pool)
            .await?;
        Ok(n >= 1)
    })
    .await?;
    agent.stop().await?;

    let identity = std::fs::read_to_string(dir.join("identity.pem"))?;
    let mut secrets = vec![created.token.clone(), created.token.rsplit('-').next().unwrap_or_default().to_owned()];
    secrets.extend(pem_body_lines(&identity, "PRIVATE KEY"));
    secrets.push(hex::encode(master_bytes));
    assert!(secrets.len() >= 4, "the key has body lines to look for");

    // The database holds no private key and no token secret (only its hash).
    let mut dump = String::new();
    for table in ["droplets", "enrollment_tokens", "certificates", "certificate_authorities"] {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM {table} t")).fetch_all(&db.pool).await?;
        dump.extend(rows);
    }
    for secret in &secrets {
        assert!(!dump.contains(secret.as_str()), "the database holds a secret");
    }
    cp.stop().await?;

    let logs = String::from_utf8(capture.0.lock().unwrap_or_else(|p| p.into_inner()).clone())?;
    assert!(logs.contains("droplet enrolled") && logs.contains("TRACE"), "the capture saw the run at TRACE level");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret appears in the logs");
    }
    Ok(())
}
