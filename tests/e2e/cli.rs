//! The `flotilla` CLI as operators and scripts use it: the built binary run as a process
//! against a real control plane (and, for deployments, a real droplet on this machine's
//! Docker engine), its `--json` output parsed and its exit codes checked.

use std::{process::Stdio, time::Duration};

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::AsyncReadExt as _;

use crate::helpers::{self, TestControlPlane, TestDb, deploy::Online};

/// The CLI configured for one control plane, as an operator's environment would be.
struct Cli {
    env: Vec<(&'static str, String)>,
}

/// How one run of the CLI ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The run, if it exited 0.
    fn ok(self) -> anyhow::Result<Self> {
        anyhow::ensure!(self.code == 0, "exit code {}: {}{}", self.code, self.stderr, self.stdout);
        Ok(self)
    }

    /// stdout as one JSON document.
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }

    /// stdout as one JSON document per line.
    fn json_lines(&self) -> anyhow::Result<Vec<Value>> {
        self.stdout.lines().map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))).collect()
    }
}

impl Cli {
    fn new(cp: &TestControlPlane) -> Self {
        Self::with_key(cp, &cp.admin_key)
    }

    fn with_key(cp: &TestControlPlane, key: &str) -> Self {
        Self {
            env: vec![
                ("FLOTILLA_URL", cp.api_url()),
                ("FLOTILLA_API_KEY", key.to_owned()),
                ("FLOTILLA_CA_CERT", cp.api_ca_file().display().to_string()),
            ],
        }
    }

    /// `flotilla args`, the binary of the `flotilla-cli` package beside the test binary.
    fn command(&self, args: &[&str]) -> anyhow::Result<tokio::process::Command> {
        let mut command = tokio::process::Command::new(helpers::process::binary("flotilla")?);
        command.args(args).env_remove("FLOTILLA_URL").env_remove("FLOTILLA_API_KEY").env_remove("FLOTILLA_CA_CERT");
        command.envs(self.env.iter().map(|(k, v)| (k, v.as_str())));
        command.stdin(Stdio::null()).kill_on_drop(true);
        Ok(command)
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<Run> {
        let output = tokio::time::timeout(Duration::from_secs(180), self.command(args)?.output())
            .await
            .with_context(|| format!("flotilla {args:?} did not finish"))??;
        Ok(Run {
            code: output.status.code().context("killed by a signal")?,
            stdout: String::from_utf8(output.stdout)?,
            stderr: String::from_utf8(output.stderr)?,
        })
    }
}

/// The ids in a list answer's `field` array.
fn ids(answer: &Value, field: &str) -> Vec<String> {
    answer[field].as_array().into_iter().flatten().filter_map(|d| d["id"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn missing_configuration_is_a_usage_error() -> anyhow::Result<()> {
    let nothing = Cli { env: vec![] };
    let run = nothing.run(&["ps"]).await?;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("FLOTILLA_URL"), "{}", run.stderr);

    let no_key = Cli { env: vec![("FLOTILLA_URL", "http://127.0.0.1:7080".into())] };
    let run = no_key.run(&["droplets", "ls"]).await?;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("FLOTILLA_API_KEY"), "{}", run.stderr);

    let bad_flag = Cli { env: vec![] }.run(&["ps", "--no-such-flag"]).await?;
    assert_eq!(bad_flag.code, 2, "{bad_flag:?}");

    // Nothing listens on port 1: unavailable, worth retrying.
    let nowhere = Cli { env: vec![("FLOTILLA_URL", "http://127.0.0.1:1".into()), ("FLOTILLA_API_KEY", "k".into())] };
    let run = nowhere.run(&["ps"]).await?;
    assert_eq!(run.code, 7, "{run:?}");
    Ok(())
}

#[tokio::test]
async fn droplets_are_created_listed_labelled_and_deleted() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let cli = Cli::new(&cp);

    let created =
        cli.run(&["droplets", "create", "--name", "web-1", "-l", "tier=web", "--json"]).await?.ok()?.json()?;
    let id = created["droplet"]["id"].as_str().context("a droplet id")?.to_owned();
    assert!(created["token"].as_str().is_some_and(|t| !t.is_empty()), "{created}");
    assert_eq!(created["droplet"]["labels"]["tier"], "web");

    // For people: the id, the token and the control plane's one-line `docker run`.
    let human = cli.run(&["droplets", "create"]).await?.ok()?;
    let install = human.stdout.lines().find(|l| l.contains("docker run")).context("an install command")?;
    for part in [
        "--env FLOTILLA_TOKEN=",
        "--volume flotilla-agent-state:/var/lib/flotilla-agent",
        &format!("--env FLOTILLA_CONTROL_PLANE='https://localhost:{}'", cp.agent_addr.port()),
    ] {
        assert!(install.contains(part), "{part} in {install}");
    }
    assert!(install.trim_end().ends_with("'flotilla-agent:test'"), "{install}");
    let bad = cli.run(&["droplets", "create", "-l", "no-equals"]).await?;
    assert_eq!(bad.code, 2, "{bad:?}");

    let table = cli.run(&["droplets", "ls"]).await?.ok()?.stdout;
    let row = table.lines().find(|l| l.starts_with(&id)).with_context(|| format!("{id} in\n{table}"))?;
    assert!(row.contains("pending"), "{row}");
    assert!(table.starts_with("ID "), "{table}");

    let pending = cli.run(&["droplets", "ls", "--status", "pending", "--json"]).await?.ok()?.json()?;
    assert!(ids(&pending, "droplets").contains(&id), "{pending}");
    assert!(pending["droplets"][0]["status"] == "DROPLET_STATUS_PENDING", "{pending}");
    let online = cli.run(&["droplets", "ls", "--status", "online", "--json"]).await?.ok()?.json()?;
    assert!(ids(&online, "droplets").is_empty(), "{online}");

    let labelled = cli.run(&["droplets", "label", &id, "zone=a", "tier=web", "--json"]).await?.ok()?.json()?;
    assert_eq!(labelled["labels"], serde_json::json!({"zone": "a", "tier": "web"}));
    let labelled = cli.run(&["droplets", "label", &id, "tier-", "--json"]).await?.ok()?.json()?;
    assert_eq!(labelled["labels"], serde_json::json!({"zone": "a"}));
    let zone_a = cli.run(&["droplets", "ls", "--selector", "zone=a", "--json"]).await?.ok()?.json()?;
    assert_eq!(ids(&zone_a, "droplets"), vec![id.clone()]);
    let unzoned = cli.run(&["droplets", "ls", "-l", "!zone", "--json"]).await?.ok()?.json()?;
    assert!(!ids(&unzoned, "droplets").contains(&id), "{unzoned}");

    let token = cli.run(&["droplets", "token", &id, "--ttl", "10m", "--json"]).await?.ok()?.json()?;
    assert_eq!(token["enrollmentToken"]["dropletId"], id.as_str());

    cli.run(&["droplets", "rm", &id]).await?.ok()?;
    let gone = cli.run(&["droplets", "get", &id]).await?;
    assert_eq!(gone.code, 4, "{gone:?}");
    assert!(gone.stderr.starts_with("flotilla: not found"), "{}", gone.stderr);
    Ok(())
}

#[tokio::test]
async fn listing_pages_through_every_droplet() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(cp.pending_droplet().await?.to_string());
    }
    let cli = Cli::new(&cp);
    let listed = cli.run(&["droplets", "ls", "--page-size", "2", "--json"]).await?.ok()?.json()?;
    let mut listed = ids(&listed, "droplets");
    listed.sort();
    made.sort();
    assert_eq!(listed, made);
    Ok(())
}

#[tokio::test]
async fn api_errors_have_distinct_exit_codes() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let cli = Cli::new(&cp);

    let unknown_key = Cli::with_key(&cp, "fk_not_a_key").run(&["ps"]).await?;
    assert_eq!(unknown_key.code, 3, "{unknown_key:?}");
    assert!(unknown_key.stderr.contains("unauthenticated"), "{}", unknown_key.stderr);

    let read = helpers::api_key(&db.pool, "default", flotilla_control_plane::api::auth::Scope::Read).await?;
    let read_only = Cli::with_key(&cp, &read).run(&["droplets", "create"]).await?;
    assert_eq!(read_only.code, 3, "{read_only:?}");

    let missing = cli.run(&["inspect", &uuid::Uuid::new_v4().to_string()]).await?;
    assert_eq!(missing.code, 4, "{missing:?}");
    let malformed = cli.run(&["tools", "not-an-id"]).await?;
    assert_eq!(malformed.code, 5, "{malformed:?}");

    // Every bad field of a spec is named, on one line.
    let droplet = cp.pending_droplet().await?.to_string();
    let invalid = cli
        .run(&["deploy", "--droplet", &droplet, "--image", "", "--port", "99999:80", "--volume", "data:relative"])
        .await?;
    assert_eq!(invalid.code, 5, "{invalid:?}");
    assert_eq!(invalid.stderr.lines().count(), 1, "{}", invalid.stderr);
    for field in ["image", "ports[0].host_port", "volumes[0]"] {
        assert!(invalid.stderr.contains(field), "{field} in {}", invalid.stderr);
    }

    // A flag the CLI itself refuses never reaches the API.
    let bad_port = cli.run(&["deploy", "--droplet", &droplet, "--image", "x", "--port", "80/sctp"]).await?;
    assert_eq!(bad_port.code, 2, "{bad_port:?}");

    // No agent ever connects to a pending droplet: the command stays queued.
    let image = helpers::deploy::IMAGE;
    let queued = cli.run(&["deploy", "--droplet", &droplet, "--image", image, "--timeout", "2s", "--json"]).await?;
    assert_eq!(queued.code, 9, "{queued:?}");
    assert!(queued.stderr.contains("queued"), "{}", queued.stderr);
    let no_wait = cli.run(&["deploy", "--droplet", &droplet, "--image", image, "--no-wait", "--json"]).await?.ok()?;
    assert_eq!(no_wait.json()?["desiredState"], "DESIRED_STATE_RUNNING");
    Ok(())
}

#[tokio::test]
async fn a_server_is_deployed_operated_and_removed() -> anyhow::Result<()> {
    let online = Online::start().await?;
    let cli = Cli::new(&online.cp);
    let droplet = online.droplet.to_string();

    let deployed = cli
        .run(&[
            "deploy",
            "--droplet",
            &droplet,
            "--name",
            "echo",
            "--image",
            helpers::deploy::IMAGE,
            "--pull",
            "never",
            "-e",
            "PORT=8080",
            "--secret",
            "API_TOKEN=s3cret",
            "--mcp-port",
            "8080",
            "--mcp-path",
            "/mcp",
            "--health",
            "mcp",
            "--timeout",
            "2m",
            "--json",
        ])
        .await?
        .ok()?
        .json()?;
    let id = deployed["id"].as_str().context("an id")?.to_owned();
    assert_eq!(deployed["container"]["state"], "CONTAINER_STATE_RUNNING", "{deployed}");
    assert_eq!(deployed["container"]["health"]["health"], "HEALTH_HEALTHY", "{deployed}");
    assert_eq!(deployed["generation"], "1", "uint64 is a string in proto3 JSON");
    let secret = deployed["spec"]["env"].as_array().into_iter().flatten().find(|v| v["name"] == "API_TOKEN");
    assert_eq!(secret.map(|v| &v["value"]), Some(&Value::from("***")));

    let ps = cli.run(&["ps", "--json"]).await?.ok()?.json()?;
    assert_eq!(ids(&ps, "deployments"), vec![id.clone()]);
    let table = cli.run(&["ps", "--droplet", &droplet]).await?.ok()?.stdout;
    let row = table.lines().find(|l| l.starts_with(&id)).with_context(|| format!("{id} in\n{table}"))?;
    for cell in ["echo", "running", "healthy", helpers::deploy::IMAGE] {
        assert!(row.contains(cell), "{cell} in {row}");
    }

    let tools = cli.run(&["tools", &id]).await?.ok()?.stdout;
    let names: Vec<&str> = tools.lines().skip(2).filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains(&"echo") && names.contains(&"add"), "{tools}");
    let tools = cli.run(&["tools", &id, "--json"]).await?.ok()?.json()?;
    let schemas = tools["tools"].as_array().context("tools")?;
    assert!(schemas.iter().all(|t| t["inputSchemaJson"].as_str().is_some_and(|s| s.starts_with('{'))), "{tools}");

    // The server says it is listening (on stderr, where the CLI writes its stderr).
    let logs = cli.run(&["logs", &id]).await?.ok()?;
    assert!(logs.stderr.contains("listening"), "{logs:?}");
    let logs = cli.run(&["logs", &id, "--tail", "5", "--json"]).await?.ok()?.json_lines()?;
    assert!(logs.iter().any(|e| e["stream"] == "STREAM_STDERR" && e["data"].is_string()), "{logs:?}");
    follow_logs(&cli, &id).await?;

    let restarted = cli.run(&["restart", &id, "--wait", "--json"]).await?.ok()?.json()?;
    assert_eq!(restarted["desiredState"], "DESIRED_STATE_RUNNING");
    cli.run(&["stop", &id, "--grace", "1s", "--wait"]).await?.ok()?;
    let stopped = cli.run(&["inspect", &id]).await?.ok()?.json()?;
    assert_eq!(stopped["desiredState"], "DESIRED_STATE_STOPPED");
    assert_ne!(stopped["container"]["state"], "CONTAINER_STATE_RUNNING", "{stopped}");
    cli.run(&["start", &id, "--wait"]).await?.ok()?;

    // Events: history without --follow, one JSON object per line, resumable by cursor.
    let events = cli.run(&["events", "--deployment", &id, "--json"]).await?.ok()?.json_lines()?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"command.succeeded") && kinds.iter().any(|k| k.starts_with("container.")), "{kinds:?}");
    let first = events[0]["cursor"].as_str().context("a cursor")?;
    let after = cli.run(&["events", "--deployment", &id, "--since-cursor", first, "--json"]).await?.ok()?;
    assert_eq!(after.json_lines()?.first(), events.get(1), "resumes right after the cursor");
    let commands = cli.run(&["events", "--deployment", &id, "--kind", "command.*"]).await?.ok()?.stdout;
    assert!(!commands.is_empty() && commands.lines().all(|l| l.contains(" command.")), "{commands}");

    cli.run(&["rm", &id, "--wait"]).await?.ok()?;
    let ps = cli.run(&["ps", "--json"]).await?.ok()?.json()?;
    assert!(ids(&ps, "deployments").is_empty(), "{ps}");
    let all = cli.run(&["ps", "--all", "--json"]).await?.ok()?.json()?;
    assert_eq!(ids(&all, "deployments"), vec![id.clone()]);
    Ok(())
}

/// `logs -f` prints the output so far and keeps the stream open.
async fn follow_logs(cli: &Cli, id: &str) -> anyhow::Result<()> {
    let mut child = cli.command(&["logs", id, "-f"])?.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stderr.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "logs -f ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("listening") {
                return Ok(());
            }
        }
    })
    .await;
    found.context("logs -f printed no `listening` line")??;
    // Still following: the process has not exited.
    assert!(child.try_wait()?.is_none(), "logs -f exited");
    child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn deploy_reports_the_pull_as_it_happens() -> anyhow::Result<()> {
    let online = Online::start().await?;
    let registry = helpers::registry::Registry::start(None).await?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let unique = helpers::registry::unique_image(helpers::deploy::IMAGE)?;
    let reference = registry.push(&unique, &format!("flotilla-test/mcp-server:{tag}"))?;
    let droplet = online.droplet.to_string();
    let run = Cli::new(&online.cp)
        .run(&["deploy", "--droplet", &droplet, "--image", &reference, "--pull", "always", "-e", "PORT=8080"])
        .await?
        .ok()?;
    // Without a terminal there is no bar: the pull's steps are lines on stderr.
    assert!(run.stderr.contains(&format!("pulling {reference}")), "{}", run.stderr);
    assert!(run.stderr.contains(&format!("pulled {reference}")), "{}", run.stderr);
    assert!(run.stdout.lines().nth(1).is_some_and(|row| row.contains("running")), "{}", run.stdout);
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &reference]).output();
    Ok(())
}
