//! The Supabase Edge Function example, exactly as the docs print it, run with Deno (PyPI
//! package `deno`, installed by `scripts/test.sh`) against a live control plane with one
//! connected droplet: it must deploy the test MCP server, see it healthy and list its tools.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::Context as _;
use flotilla_control_plane::api::auth::Scope;
use serde_json::{Value, json};

use crate::helpers::{
    self,
    deploy::{IMAGE, Online},
};

/// Where the example is printed, verbatim: the README.
const DOCS: &[&str] = &["README.md"];
const SECTION: &str = "## Calling Flotilla from a Supabase Edge Function";

/// The section's TypeScript block.
fn example() -> anyhow::Result<String> {
    for doc in DOCS {
        let Ok(text) = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)) else { continue };
        let Some(start) = text.find(SECTION) else { continue };
        let section = &text[start + SECTION.len()..];
        let section = section.find("\n## ").map_or(section, |end| &section[..end]);
        let code = section
            .split_once("```typescript\n")
            .and_then(|(_, rest)| rest.split_once("\n```"))
            .map(|(code, _)| code)
            .with_context(|| format!("{doc}: the section has no ```typescript block"))?;
        anyhow::ensure!(code.contains("Deno.serve("), "{doc}: the TypeScript block is not an Edge Function");
        return Ok(code.to_owned());
    }
    anyhow::bail!("no {SECTION:?} in {DOCS:?}")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_edge_function_deploys_an_mcp_server_and_lists_its_tools() -> anyhow::Result<()> {
    let online = Online::start().await?;
    let key = helpers::api_key(&online.db.pool, "default", Scope::Write).await?;
    let dir = helpers::temp_dir("flotilla-edge-function");
    std::fs::write(dir.join("index.ts"), example()?)?;
    let log = std::fs::File::create(dir.join("deno.log"))?;
    let port = free_port()?;
    let ca = online.cp.api_ca_file();
    let mut deno = tokio::process::Command::new("deno")
        .args(["run", "--allow-net", "--allow-env", "--cert"])
        .arg(&ca)
        .arg("index.ts")
        .current_dir(&dir)
        .env("FLOTILLA_URL", online.cp.api_url())
        .env("FLOTILLA_API_KEY", &key)
        // Where `Deno.serve` listens (it takes no port in the example, as on Supabase).
        .env("DENO_SERVE_ADDRESS", format!("tcp:127.0.0.1:{port}"))
        .env("DENO_NO_UPDATE_CHECK", "1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("running deno: scripts/test.sh installs it (python3 -m pip install deno)")?;
    let deno_log = || std::fs::read_to_string(dir.join("deno.log")).unwrap_or_default();

    let listening = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if let Some(status) = deno.try_wait()? {
            anyhow::bail!("deno exited ({status}):\n{}", deno_log());
        }
        anyhow::ensure!(tokio::time::Instant::now() < listening, "deno is not listening:\n{}", deno_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let client = helpers::http_client(None)?;
    let url = format!("http://127.0.0.1:{port}/");
    let body = json!({"droplet_id": online.droplet.to_string(), "image": IMAGE, "pull_policy": "PULL_POLICY_NEVER"});
    // An Edge Function has 150 s; the example keeps to 120 s.
    let response = client
        .post(&url)
        .header("idempotency-key", "edge-1")
        .json(&body)
        .timeout(Duration::from_secs(150))
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    assert_eq!(status, 200, "{answer}\n{}", deno_log());
    assert_eq!(answer["healthy"], true, "{answer}");
    let tools: Vec<&str> = answer["tools"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(tools.contains(&"echo") && tools.contains(&"add"), "{answer}");

    // Errors are answered with the API's own code and message.
    let missing = json!({"droplet_id": uuid::Uuid::new_v4().to_string(), "image": IMAGE});
    let response = client.post(&url).json(&missing).send().await?;
    assert_eq!(response.status(), 404);
    let answer: Value = response.json().await?;
    assert_eq!(answer["code"], "NOT_FOUND", "{answer}");

    deno.kill().await?;
    online.agent.stop().await?;
    online.cp.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
