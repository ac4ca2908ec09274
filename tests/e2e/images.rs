//! The container images `scripts/images.sh` builds (docker/*.Dockerfile): labels, user,
//! health checks and entrypoints as the Dockerfiles say, binaries that run, an agent image
//! that stays small, and a control plane container that turns healthy. Nothing is pulled.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::helpers::TestDb;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The base (Debian's bookworm-slim, ~75 MB) plus room for the agent binary: ~27 MB built
/// by scripts/images.sh (debug info stripped), ~80 MB unstripped. An image over this has
/// lost the strip or gained a layer it should not have.
const AGENT_IMAGE_MAX_BYTES: u64 = 130 * 1000 * 1000;

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("docker").args(args).output().context("running docker")?;
    ensure!(output.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    Ok(String::from_utf8(output.stdout)?)
}

/// `docker image inspect` of `name:<workspace version>`, or why the tests cannot run.
fn inspect(name: &str) -> anyhow::Result<Value> {
    let image = format!("{name}:{VERSION}");
    let json = docker(&["image", "inspect", &image])
        .with_context(|| format!("{image} is missing: run scripts/images.sh (scripts/test.sh does)"))?;
    let mut all: Vec<Value> = serde_json::from_str(&json)?;
    all.pop().with_context(|| format!("no image {image}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The OCI labels: title, this version, a revision that is a commit of this repository
/// (or `unknown` where git is not available), the source and the licence.
fn check_labels(image: &Value, title: &str) -> anyhow::Result<()> {
    let labels = &image["Config"]["Labels"];
    let label = |key: &str| labels[format!("org.opencontainers.image.{key}")].as_str().unwrap_or_default();
    assert_eq!(label("title"), title);
    assert_eq!(label("version"), VERSION);
    assert_eq!(label("licenses"), "Apache-2.0");
    assert_eq!(label("source"), "https://github.com/flotilla-dev/flotilla");
    let revision = label("revision");
    let known = Command::new("git")
        .args(["cat-file", "-e", &format!("{revision}^{{commit}}")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(known || revision == "unknown", "revision label {revision:?} is not a commit here");
    Ok(())
}

#[test]
fn control_plane_image_runs_as_its_own_user_with_a_health_check() -> anyhow::Result<()> {
    let image = inspect("flotilla-control-plane")?;
    check_labels(&image, "flotilla-control-plane")?;
    let config = &image["Config"];
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(strings(&config["Entrypoint"]), ["/usr/local/bin/flotilla-control-plane"]);
    assert_eq!(strings(&config["Cmd"]), ["serve"]);
    assert_eq!(strings(&config["Healthcheck"]["Test"]), ["CMD", "/usr/local/bin/flotilla-healthcheck"]);
    for port in ["7443/tcp", "7444/tcp", "7080/tcp"] {
        assert!(config["ExposedPorts"].get(port).is_some(), "{port} is not exposed");
    }
    assert!(config["Volumes"].get("/var/lib/flotilla").is_some(), "no data volume");
    assert!(strings(&config["Env"]).contains(&"FLOTILLA_API_LISTEN=0.0.0.0:7080"));

    let tag = format!("flotilla-control-plane:{VERSION}");
    let version = docker(&["run", "--rm", &tag, "--version"])?;
    assert_eq!(version.trim(), format!("flotilla-control-plane {VERSION}"));
    let help = docker(&["run", "--rm", &tag, "serve", "--help"])?;
    assert!(help.contains("--api-plaintext") && help.contains("--agent-image"), "{help}");
    // The user exists, owns the data dir, and the check and the CA bundle are in place.
    let inside = docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "id -un; stat -c %u:%a /var/lib/flotilla; test -x /usr/local/bin/flotilla-healthcheck && \
         test -s /etc/ssl/certs/ca-certificates.crt && echo ready",
    ])?;
    assert_eq!(inside.lines().collect::<Vec<_>>(), ["flotilla", "10001:700", "ready"]);
    Ok(())
}

#[test]
fn agent_image_runs_as_root_is_healthy_once_enrolled_and_stays_small() -> anyhow::Result<()> {
    let image = inspect("flotilla-agent")?;
    check_labels(&image, "flotilla-agent")?;
    let config = &image["Config"];
    assert!(matches!(config["User"].as_str(), Some("" | "root")), "the agent needs root for the Docker socket");
    assert_eq!(strings(&config["Entrypoint"]), ["/usr/local/bin/flotilla-agent"]);
    // The same check as the cloud-init user data and the `byo` line.
    assert_eq!(strings(&config["Healthcheck"]["Test"]), ["CMD", "test", "-s", "/var/lib/flotilla-agent/identity.pem"]);
    assert!(config["Volumes"].get("/var/lib/flotilla-agent").is_some(), "no state volume");

    let tag = format!("flotilla-agent:{VERSION}");
    let version = docker(&["run", "--rm", &tag, "--version"])?;
    assert_eq!(version.trim(), format!("flotilla-agent {VERSION}"));
    let help = docker(&["run", "--rm", &tag, "--help"])?;
    assert!(help.contains("--control-plane") && help.contains("--state-dir"), "{help}");

    let size = image["Size"].as_u64().context("no image size")?;
    println!("{tag}: {size} bytes ({:.1} MB)", size as f64 / 1e6);
    assert!(size < AGENT_IMAGE_MAX_BYTES, "{tag} is {size} bytes, over {AGENT_IMAGE_MAX_BYTES}");
    Ok(())
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "--force", &self.0]).output();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `DATABASE_URL` with its database replaced by `name`.
fn database_url(name: &str) -> anyhow::Result<String> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL (scripts/test.sh sets it)")?;
    let (address, query) = url.split_once('?').map_or((url.as_str(), None), |(a, q)| (a, Some(q)));
    let (server, _) = address.rsplit_once('/').context("DATABASE_URL names no database")?;
    Ok(query.map_or_else(|| format!("{server}/{name}"), |q| format!("{server}/{name}?{q}")))
}

/// The image's HEALTHCHECK (bash's /dev/tcp: a TLS ClientHello, or GET /healthz over
/// plaintext) turns a serving control plane `healthy`, with either kind of API.
#[tokio::test]
async fn control_plane_container_turns_healthy_with_tls_and_plaintext_apis() -> anyhow::Result<()> {
    // A database of its own: the CA it makes is sealed with this test's master key.
    let db = TestDb::new().await?;
    let database = database_url(&db.name)?;
    let key = hex::encode(rand::random::<[u8; 32]>());
    let tag = format!("flotilla-control-plane:{VERSION}");
    // One after the other: the first makes the fleet CA, the second finds it.
    for plaintext in [false, true] {
        let (agent, enroll, api) = (free_port()?, free_port()?, free_port()?);
        let container = Container(format!("flotilla-images-test-{}", uuid::Uuid::new_v4().simple()));
        let mut args: Vec<String> =
            ["run", "--detach", "--name", &container.0, "--network", "host", "--health-interval", "1s"]
                .map(String::from)
                .into();
        for env in [
            format!("DATABASE_URL={database}"),
            format!("FLOTILLA_MASTER_KEY={key}"),
            format!("FLOTILLA_AGENT_LISTEN=127.0.0.1:{agent}"),
            format!("FLOTILLA_ENROLL_LISTEN=127.0.0.1:{enroll}"),
            format!("FLOTILLA_API_LISTEN=127.0.0.1:{api}"),
        ] {
            args.extend(["--env".into(), env]);
        }
        args.push(tag.clone());
        if plaintext {
            args.extend(["serve".into(), "--api-plaintext".into()]);
        }
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;

        let until = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let state = docker(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.Health.Status}}{{range .State.Health.Log}}|{{.Output}}{{end}}",
                &container.0,
            ])?;
            if state.starts_with("running healthy") {
                let expected = if plaintext { "ok: /healthz" } else { "ok: TLS" };
                assert!(state.contains(expected), "plaintext {plaintext}: {state}");
                break;
            }
            if !state.starts_with("running") || std::time::Instant::now() > until {
                let logs = Command::new("docker").args(["logs", "--tail", "20", &container.0]).output()?;
                bail!("plaintext {plaintext}: not healthy: {state}\n{}", String::from_utf8_lossy(&logs.stderr));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}
