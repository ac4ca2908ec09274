//! The OpenAPI document at `/openapi.json`, checked by tools that share no code with the
//! routes: `openapi-spec-validator` reads the document, and `schemathesis` sends what the
//! document allows (and what it forbids) to a live control plane and holds every answer
//! to the document. `scripts/test.sh` installs both (PyPI); without them the test fails.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use flotilla_control_plane::api::auth::Scope;
use serde_json::{Value, json};

use crate::helpers::{self, TestControlPlane, TestDb};

/// Cases per operation and phase; with the fixed seed the run is the same every time.
const MAX_EXAMPLES: &str = "15";
const SEED: &str = "20260101";
/// The whole schemathesis run, at most (it needs about a minute on two cores).
const RUN_LIMIT: Duration = Duration::from_secs(360);

/// Runs `program` (a PyPI tool), failing loudly when it is not installed.
fn run(program: &str, args: &[&str], env: &[(&str, &str)], cwd: &Path, limit: Duration) -> anyhow::Result<Output> {
    let mut command = Command::new(program);
    command.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().map_err(|e| {
        anyhow::anyhow!("running {program} ({e}): scripts/test.sh installs it (python3 -m pip install {program})")
    })?;
    // Read the pipes on threads so a chatty tool cannot block on a full pipe.
    let stdout = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut out, &mut text).map(|_| text).unwrap_or_default()
        })
    });
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut err, &mut text).map(|_| text).unwrap_or_default()
        })
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            child.kill()?;
            child.wait()?;
            anyhow::bail!("{program} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = |handle: Option<std::thread::JoinHandle<String>>| handle.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output { status, stdout: text(stdout).into_bytes(), stderr: text(stderr).into_bytes() })
}

fn describe(output: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// A droplet (pending: no agent) with a deployment, a token and a command, so the lists
/// and gets that schemathesis calls answer with real objects.
async fn seed(client: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<String> {
    let post = |path: &str, body: Value| client.post(format!("{base}{path}")).bearer_auth(key).json(&body).send();
    let token: Value = post("/v1/enrollment-tokens", json!({"name": "openapi", "ttl": "3600s"})).await?.json().await?;
    let droplet = token["enrollmentToken"]["dropletId"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(!droplet.is_empty(), "no droplet in {token}");
    let spec = json!({
        "image": helpers::deploy::IMAGE,
        "pullPolicy": "PULL_POLICY_NEVER",
        "env": [{"name": "PORT", "value": "8080"}, {"name": "API_TOKEN", "value": "s3cret", "secret": true}],
        "mcp": {"port": 8080, "path": "/mcp"},
        "healthCheck": {"mcp": {}, "interval": "5s"},
        "labels": {"team": "tools"},
        "resources": {"memoryBytes": "268435456"},
    });
    let created = post(&format!("/v1/droplets/{droplet}/deployments"), json!({"name": "echo", "spec": spec})).await?;
    anyhow::ensure!(created.status() == 200, "creating a deployment: {}", created.text().await?);
    let labels = client
        .put(format!("{base}/v1/droplets/{droplet}/labels"))
        .bearer_auth(key)
        .json(&json!({"labels": {"region": "local"}}))
        .send()
        .await?;
    anyhow::ensure!(labels.status() == 200, "labelling the droplet: {}", labels.text().await?);
    Ok(droplet)
}

/// What schemathesis is told beyond the document, each for a reason the document cannot
/// carry. Nothing here hides a check: each pins a value or widens one expectation.
fn config(droplet: &str, spare_key: &str) -> String {
    format!(
        r#"
# 412 (FAILED_PRECONDITION) is this API's "the resource's state does not allow this
# now", e.g. a live read of a droplet that has no session, or a change to a removed
# deployment (checked before its body): a request at the wrong time, like 409, which
# schemathesis already expects of valid requests and accepts as a refusal of invalid ones.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "412", "415", "422", "428", "429", "5xx"]

# Page tokens and event cursors are opaque: only the server makes valid ones, and a
# token it did not issue is refused (400), so no schema can make generated ones valid.
[parameters]
"query.pageToken" = ""
"query.cursor" = ""

# ListCommands needs a droplet or a deployment (at least one of two parameters, which
# OpenAPI cannot say).
[[operations]]
include-name = "GET /v1/commands"
parameters = {{ "query.dropletId" = "{droplet}" }}

# A deployment spec has rules between fields that JSON Schema cannot say (the document
# says them in words): an HTTP probe's status range is both 0 or 100 <= min <= max <= 599,
# the probe timeout at most its interval, env names and published host ports unique.
# A spec breaking one of them is refused (400) although each field is valid alone.
[[operations]]
include-name = ["POST /v1/droplets/{{droplet_id}}/deployments", "PUT /v1/deployments/{{id}}"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "412", "429", "5xx"]

# Revoking the key this run calls with would turn every later call into a 401: revoke a
# spare one instead.
[[operations]]
include-name = "POST /v1/api-keys/{{id}}:revoke"
parameters = {{ "path.id" = "{spare_key}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_valid_and_the_live_api_keeps_to_it() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let ca_file = cp.api_ca_file();
    let client = helpers::http_client(Some(&std::fs::read_to_string(&ca_file)?))?;
    let base = cp.api_url();

    // Served without a key, as JSON.
    let response = client.get(format!("{base}/openapi.json")).send().await?;
    assert_eq!(response.status(), 200);
    let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(kind.starts_with("application/json"), "{kind}");
    let document: Value = response.json().await?;
    assert_eq!(document["openapi"], "3.1.0");

    let dir = helpers::temp_dir("flotilla-openapi");
    let file = dir.join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&document)?)?;
    let file_arg = file.to_string_lossy().into_owned();
    let cwd = dir.clone();
    let validated = tokio::task::spawn_blocking(move || {
        run("openapi-spec-validator", &[&file_arg], &[], &cwd, Duration::from_secs(120))
    })
    .await??;
    assert!(validated.status.success(), "openapi-spec-validator:\n{}", describe(&validated));

    let droplet = seed(&client, &base, &cp.admin_key).await?;
    let key = helpers::api_key(&db.pool, "default", Scope::Admin).await?;
    let spare = flotilla_control_plane::api::auth::create(&db.pool, "default", Scope::Read, "spare", None).await?.id;
    std::fs::write(dir.join("schemathesis.toml"), config(&droplet, &spare.to_string()))?;
    let report = schemathesis(&base, &key, &ca_file, &dir).await?;
    assert!(report.status.success(), "schemathesis found problems:\n{}", describe(&report));
    println!("{}", describe(&report));

    cp.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `st run` against the live API with every check.
async fn schemathesis(base: &str, key: &str, ca_file: &Path, dir: &Path) -> anyhow::Result<Output> {
    let url = format!("{base}/openapi.json");
    let auth = format!("Authorization: Bearer {key}");
    let ca = ca_file.to_string_lossy().into_owned();
    let reports = dir.join("schemathesis").to_string_lossy().into_owned();
    let mut args = vec![
        "run".to_owned(),
        url,
        "--header".into(),
        auth,
        "--checks".into(),
        "all".into(),
        // Removing a deployment keeps its record (desired state REMOVED; its reads still
        // answer, as with a soft delete), so "deleted resource still available" does not
        // apply to it, and the stateful phase takes no per-operation check settings.
        "--exclude-checks".into(),
        "use_after_free".into(),
        "--max-examples".into(),
        MAX_EXAMPLES.into(),
        "--seed".into(),
        SEED.into(),
        // One worker: hypothesis on CPython 3.11 fails in `ast.parse` when two threads
        // describe strategies at once ("AST constructor recursion depth mismatch").
        "--workers".into(),
        "1".into(),
        // Followed streams (WatchEvents, TailLogs with `follow`) never end by themselves:
        // schemathesis reads each for this long, then checks the events it got.
        "--request-timeout".into(),
        "3".into(),
        "--no-color".into(),
        // A HAR file of every request, kept (with the rest of `dir`) when the test fails.
        "--report".into(),
        "har".into(),
        "--report-dir".into(),
        reports,
    ];
    args.splice(0..0, ["--config-file".to_owned(), dir.join("schemathesis.toml").to_string_lossy().into_owned()]);
    // The API's certificate is from the fleet CA once it serves https.
    if base.starts_with("https://") {
        args.extend(["--tls-verify".into(), ca.clone()]);
    }
    let cwd = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = [("REQUESTS_CA_BUNDLE", ca.as_str()), ("SSL_CERT_FILE", ca.as_str())];
        run("st", &args, &env, &cwd, RUN_LIMIT)
    })
    .await?
}
