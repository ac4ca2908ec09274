//! The fleet API over HTTP/JSON, with a real HTTP client: the same objects, errors and
//! authorisation as gRPC, on the same port.

use std::time::Duration;

use flotilla_control_plane::api::auth::Scope;
use serde_json::{Value, json};

use crate::helpers::{
    self, TestControlPlane, TestDb, api_key,
    deploy::{IMAGE, Online},
};

/// A JSON client of one control plane's HTTP side, calling with one key.
struct Http {
    base: String,
    key: Option<String>,
    client: reqwest::Client,
}

impl Http {
    fn new(cp: &TestControlPlane, key: Option<&str>) -> Self {
        let client = cp.http().expect("an HTTP client trusting the fleet CA");
        Self { base: cp.api_url(), key: key.map(str::to_owned), client }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("not JSON ({e}): {text:?}"))?;
        Ok((status, body))
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        self.send(self.request(reqwest::Method::POST, path).json(&body)).await
    }
}

/// An error body: `{code, message, details}`, with the HTTP status expected.
fn assert_error(answer: &(u16, Value), status: u16, code: &str, message_starts: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(message_starts), "{message:?} should start with {message_starts:?}");
    assert!(body["details"].is_array(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn droplets_and_tokens_through_http_with_every_kind_of_bad_request() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).start().await?;
    let admin = Http::new(&cp, Some(&cp.admin_key));

    // Health and readiness need no key.
    let anonymous = Http::new(&cp, None);
    assert_eq!(anonymous.get("/healthz").await?, (200, json!({"status": "ok"})));
    assert_eq!(anonymous.get("/readyz").await?, (200, json!({"status": "ready"})));

    // A token makes a pending droplet; the answer has the gRPC answer's JSON shape.
    let (status, created) = admin.post("/v1/enrollment-tokens", json!({"name": "web-1", "ttl": "600s"})).await?;
    assert_eq!(status, 200, "{created}");
    assert!(created["token"].as_str().is_some_and(|t| !t.is_empty()));
    let droplet = created["enrollmentToken"]["dropletId"].as_str().unwrap_or_default().to_owned();
    let (status, got) = admin.get(&format!("/v1/droplets/{droplet}")).await?;
    assert_eq!(status, 200);
    assert_eq!(got["status"], "DROPLET_STATUS_PENDING");
    assert_eq!(got["account"], "default");

    // Labels, and a selector in the query string.
    let labels = admin
        .send(
            admin
                .request(reqwest::Method::PUT, &format!("/v1/droplets/{droplet}/labels"))
                .json(&json!({"labels": {"tier": "edge"}})),
        )
        .await?;
    assert_eq!(labels.0, 200, "{}", labels.1);
    assert_eq!(labels.1["labels"]["tier"], "edge");
    let (_, listed) = admin.get("/v1/droplets?label_selector=tier%3Dedge&pageSize=10").await?;
    assert_eq!(listed["droplets"][0]["id"], droplet.as_str());
    let (_, none) = admin.get("/v1/droplets?label_selector=tier%3Dcore").await?;
    assert!(none.get("droplets").is_none_or(|d| d.as_array().is_some_and(Vec::is_empty)), "{none}");

    // Pagination over HTTP: every droplet once, in a stable order.
    for _ in 0..4 {
        admin.post("/v1/enrollment-tokens", json!({})).await?;
    }
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let (status, page) = admin.get(&format!("/v1/droplets?page_size=2&page_token={token}")).await?;
        assert_eq!(status, 200, "{page}");
        for d in page["droplets"].as_array().cloned().unwrap_or_default() {
            seen.push(d["id"].as_str().unwrap_or_default().to_owned());
        }
        token = page["nextPageToken"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            break;
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((seen.len(), sorted.len()), (5, 5), "{seen:?}");
    assert_eq!(seen, sorted, "pages are in id order");

    // Credentials: missing, malformed, unknown; a read key writing; another account.
    assert_error(&anonymous.get("/v1/droplets").await?, 401, "UNAUTHENTICATED", "authorization: missing");
    let malformed = anonymous
        .send(anonymous.request(reqwest::Method::GET, "/v1/droplets").header("authorization", "Token x"))
        .await?;
    assert_error(&malformed, 401, "UNAUTHENTICATED", "authorization: expected `Bearer");
    let unknown = Http::new(&cp, Some("flk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
    assert_error(&unknown.get("/v1/droplets").await?, 401, "UNAUTHENTICATED", "authorization: unknown API key");
    let reader = Http::new(&cp, Some(&api_key(&db.pool, "default", Scope::Read).await?));
    assert_error(
        &reader.post("/v1/enrollment-tokens", json!({})).await?,
        403,
        "PERMISSION_DENIED",
        "CreateEnrollmentToken needs the write scope",
    );
    let stranger = Http::new(&cp, Some(&api_key(&db.pool, "globex", Scope::Admin).await?));
    let stranger_view = Http { key: Some(api_key(&db.pool, "globex", Scope::Write).await?), ..stranger };
    assert_error(
        &stranger_view.get(&format!("/v1/droplets/{droplet}")).await?,
        404,
        "NOT_FOUND",
        &format!("droplet {droplet} not found"),
    );

    // Bodies: not JSON, not an object, unknown fields, wrong types, too large, wrong type.
    let raw = |body: &'static str| {
        admin
            .request(reqwest::Method::POST, "/v1/enrollment-tokens")
            .header("content-type", "application/json")
            .body(body)
    };
    assert_error(&admin.send(raw("{not json")).await?, 400, "INVALID_ARGUMENT", "body: not valid JSON");
    assert_error(&admin.send(raw("[1, 2]")).await?, 400, "INVALID_ARGUMENT", "body: must be a JSON object");
    let unknown_field = admin.post("/v1/enrollment-tokens", json!({"colour": "red"})).await?;
    assert_error(&unknown_field, 400, "INVALID_ARGUMENT", "request:");
    assert!(unknown_field.1["message"].as_str().unwrap_or_default().contains("colour"), "{}", unknown_field.1);
    let wrong_type = admin.post("/v1/enrollment-tokens", json!({"ttl": 5})).await?;
    assert_error(&wrong_type, 400, "INVALID_ARGUMENT", "request:");
    let huge = "x".repeat(flotilla_control_plane::api::http::MAX_BODY + 1);
    let too_large = admin.post("/v1/enrollment-tokens", json!({ "name": huge })).await?;
    assert_error(&too_large, 413, "INVALID_ARGUMENT", "body: larger than");
    let form = admin
        .send(
            admin
                .request(reqwest::Method::POST, "/v1/enrollment-tokens")
                .header("content-type", "text/plain")
                .body("{}"),
        )
        .await?;
    assert_error(&form, 415, "INVALID_ARGUMENT", "content-type");
    assert_error(
        &admin.get("/v1/droplets/not-a-uuid").await?,
        400,
        "INVALID_ARGUMENT",
        "id: \"not-a-uuid\" is not a UUID",
    );
    assert_error(&admin.get("/v1/droplets?page_size=x").await?, 400, "INVALID_ARGUMENT", "page_size:");
    assert_error(&admin.get("/v1/droplets?colour=red").await?, 400, "INVALID_ARGUMENT", "colour: not a parameter");
    assert_error(&admin.get("/v1/nothing-here").await?, 404, "NOT_FOUND", "no route GET /v1/nothing-here");
    let wrong_method = admin.send(admin.request(reqwest::Method::PATCH, "/v1/droplets")).await?;
    assert_error(&wrong_method, 405, "METHOD_NOT_ALLOWED", "/v1/droplets answers GET");
    let conflict = admin
        .send(admin.request(reqwest::Method::PUT, &format!("/v1/droplets/{droplet}/labels")).json(&json!({"id": "x"})))
        .await?;
    assert_error(&conflict, 400, "INVALID_ARGUMENT", "id: the path says");

    // Nothing bad requests did changed what is stored.
    let (_, kept) = admin.get(&format!("/v1/droplets/{droplet}")).await?;
    assert_eq!(kept["labels"]["tier"], "edge");

    // Request ids: echoed when given, made when not.
    let response =
        admin.request(reqwest::Method::GET, "/v1/droplets").header("x-request-id", "trace-me-42").send().await?;
    assert_eq!(response.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("trace-me-42"));
    let response = admin.request(reqwest::Method::GET, "/v1/droplets").send().await?;
    assert!(response.headers().get("x-request-id").is_some_and(|v| v.len() >= 32));

    // Metrics: Prometheus text, open like the health endpoints.
    let metrics = admin.client.get(format!("{}/metrics", admin.base)).send().await?;
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await?;
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (_, value) = line.rsplit_once(' ').ok_or_else(|| anyhow::anyhow!("not `name value`: {line}"))?;
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    for expected in [
        "flotilla_droplets{status=\"pending\"} 5",
        "flotilla_api_requests_total{route=\"GET /v1/droplets\",code=\"200\"}",
        "flotilla_api_requests_total{route=\"POST /v1/enrollment-tokens\",code=\"403\"}",
        "flotilla_api_requests_total{route=\"other\",code=\"404\"}",
        "flotilla_commands_open{state=\"queued\"} 0",
        "flotilla_heartbeat_flush_lag_seconds",
        "flotilla_command_round_trip_seconds_bucket",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }

    // A bring-your-own-host droplet: pending, with its token and the line to run.
    let (status, byo) = admin
        .post(
            "/v1/droplets",
            json!({"provider": "byo", "name": "edge-9", "labels": {"tier": "byo"}, "tokenTtl": "900s"}),
        )
        .await?;
    assert_eq!(status, 200, "{byo}");
    assert_eq!(byo["droplet"]["status"], "DROPLET_STATUS_PENDING");
    assert_eq!(byo["droplet"]["labels"]["tier"], "byo");
    let token = byo["token"].as_str().unwrap_or_default();
    let line = byo["installCommand"].as_str().unwrap_or_default();
    assert!(token.starts_with("FLT1-"), "{byo}");
    assert!(
        line.starts_with("docker run --detach --name flotilla-agent --restart unless-stopped --network host"),
        "{line}"
    );
    assert!(line.contains(&format!("--env FLOTILLA_TOKEN='{token}'")), "{line}");
    assert!(
        line.contains(&format!("--env FLOTILLA_CONTROL_PLANE='https://localhost:{}'", cp.agent_addr.port())),
        "{line}"
    );
    assert!(line.ends_with("'flotilla-agent:test'") && !line.contains('\n'), "{line}");
    let unknown = admin.post("/v1/droplets", json!({"provider": "moon"})).await?;
    assert_error(&unknown, 400, "INVALID_ARGUMENT", "provider: \"moon\"");
    let bad_labels = admin.post("/v1/droplets", json!({"labels": {"-x": "y"}})).await?;
    assert_error(&bad_labels, 400, "INVALID_ARGUMENT", "labels:");

    // Delete, then it is gone.
    let deleted = admin.send(admin.request(reqwest::Method::DELETE, &format!("/v1/droplets/{droplet}"))).await?;
    assert_eq!(deleted.0, 200, "{}", deleted.1);
    assert_error(&admin.get(&format!("/v1/droplets/{droplet}")).await?, 404, "NOT_FOUND", "droplet");
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let cp = TestControlPlane::builder(&db.pool).per_second(2).start().await?;
    let admin = Http::new(&cp, Some(&cp.admin_key));
    let mut limited = None;
    // Two a second with bursts of four: ten at once cannot all pass.
    for _ in 0..10 {
        let response = admin.request(reqwest::Method::GET, "/v1/droplets").send().await?;
        if response.status().as_u16() == 429 {
            limited = Some(response);
            break;
        }
    }
    let response = limited.ok_or_else(|| anyhow::anyhow!("ten requests at once were never limited"))?;
    let retry_after: u64 =
        response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    assert!((1..=2).contains(&retry_after), "retry-after {retry_after}");
    let body: Value = response.json().await?;
    assert_eq!(body["code"], "RESOURCE_EXHAUSTED");
    assert_eq!(body["details"][0]["@type"], "type.googleapis.com/google.rpc.RetryInfo");
    // Another key is not held back by the first one's rate.
    let other = Http::new(&cp, Some(&api_key(&db.pool, "default", Scope::Read).await?));
    assert_eq!(other.get("/v1/droplets").await?.0, 200);
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_healthy_tools_logs_and_remove_over_http() -> anyhow::Result<()> {
    let online = Online::start().await?;
    let cp = &online.cp;
    let http = Http::new(cp, Some(&cp.admin_key));
    let spec = json!({
        "image": IMAGE,
        "pullPolicy": "PULL_POLICY_NEVER",
        "env": [{"name": "PORT", "value": "8080"}, {"name": "API_TOKEN", "value": "s3cret-http", "secret": true}],
        "mcp": {"port": 8080, "path": "/mcp"},
        "healthCheck": {"mcp": {}, "interval": "1s"},
    });

    // An invalid spec names each bad field, in the message and as BadRequest details.
    let bad = json!({"name": "bad", "spec": {"image": "", "ports": [{"containerPort": 0}]}});
    let refused = http.post(&format!("/v1/droplets/{}/deployments", online.droplet), bad).await?;
    assert_error(&refused, 400, "INVALID_ARGUMENT", "");
    let violations = refused.1["details"][0]["fieldViolations"].as_array().cloned().unwrap_or_default();
    let fields: Vec<&str> = violations.iter().filter_map(|v| v["field"].as_str()).collect();
    assert!(fields.contains(&"spec.image"), "{fields:?}");
    assert!(fields.iter().any(|f| f.starts_with("spec.ports")), "{fields:?}");

    // validate_only: checked like a create, answered with what it would make, nothing stored.
    let (status, preview) = http
        .post(
            &format!("/v1/droplets/{}/deployments", online.droplet),
            json!({"name": "echo", "spec": spec, "validateOnly": true}),
        )
        .await?;
    assert_eq!(status, 200, "{preview}");
    assert!(preview.get("id").is_none() && preview.get("lastCommandId").is_none(), "{preview}");
    assert_eq!(preview["spec"]["env"][1]["value"], "***");
    let (_, none_yet) = http.get(&format!("/v1/droplets/{}/deployments", online.droplet)).await?;
    assert!(none_yet.get("deployments").is_none(), "nothing stored: {none_yet}");
    let invalid = json!({"spec": {"image": ""}, "validateOnly": true});
    assert_error(
        &http.post(&format!("/v1/droplets/{}/deployments", online.droplet), invalid).await?,
        400,
        "INVALID_ARGUMENT",
        "",
    );

    let body = json!({"name": "echo", "spec": spec, "options": {"idempotencyKey": "http-create-1"}});
    let (status, created) = http.post(&format!("/v1/droplets/{}/deployments", online.droplet), body.clone()).await?;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(created["spec"]["env"][1]["value"], "***", "secrets are masked");
    // The same idempotency key: the same deployment and command, not a second one.
    let (_, again) = http.post(&format!("/v1/droplets/{}/deployments", online.droplet), body).await?;
    assert_eq!((&again["id"], &again["lastCommandId"]), (&created["id"], &created["lastCommandId"]));

    let command = created["lastCommandId"].as_str().unwrap_or_default();
    let (status, waited) = http.post(&format!("/v1/commands/{command}:wait"), json!({"timeout": "120s"})).await?;
    assert_eq!(status, 200, "{waited}");
    assert_eq!(waited["state"], "STATE_SUCCEEDED", "{waited}");

    helpers::wait_for("the deployment to be healthy over HTTP", Duration::from_secs(60), || async {
        let (_, got) = http.get(&format!("/v1/deployments/{id}")).await?;
        Ok(got["container"]["health"]["health"] == "HEALTH_HEALTHY")
    })
    .await?;
    let (_, tools) = http.get(&format!("/v1/deployments/{id}/tools")).await?;
    let names: Vec<&str> =
        tools["tools"].as_array().map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect()).unwrap_or_default();
    assert!(names.contains(&"echo") && names.contains(&"add"), "{tools}");
    let (_, listed) = http.get(&format!("/v1/droplets/{}/deployments", online.droplet)).await?;
    assert_eq!(listed["deployments"][0]["id"], id.as_str());
    let (_, container) = http.get(&format!("/v1/deployments/{id}/container")).await?;
    assert_eq!(container["state"], "CONTAINER_STATE_RUNNING", "{container}");
    let (status, checked) = http.post(&format!("/v1/deployments/{id}:check-health"), json!({})).await?;
    assert_eq!(status, 200, "{checked}");
    assert_eq!(checked["health"]["health"], "HEALTH_HEALTHY", "{checked}");

    // Logs as Server-Sent Events: the test server's start-up line is there.
    let response = http.request(reqwest::Method::GET, &format!("/v1/deployments/{id}/logs?tail=100")).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let events = response.text().await?;
    let mut lines = String::new();
    for data in events.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let entry: Value = serde_json::from_str(data)?;
        let bytes = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            entry["data"].as_str().unwrap_or_default(),
        )?;
        lines.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(events.contains("event: message"), "{events}");
    assert!(lines.contains("listening"), "{lines}");

    // Restart, then remove.
    let (status, restarted) = http.post(&format!("/v1/deployments/{id}:restart"), json!({"grace": "1s"})).await?;
    assert_eq!(status, 200, "{restarted}");
    let command = restarted["lastCommandId"].as_str().unwrap_or_default();
    let (_, waited) = http.post(&format!("/v1/commands/{command}:wait"), json!({"timeout": "60s"})).await?;
    assert_eq!(waited["state"], "STATE_SUCCEEDED", "{waited}");
    let (_, commands) = http.get(&format!("/v1/commands?deployment_id={id}")).await?;
    assert_eq!(commands["commands"].as_array().map(Vec::len), Some(2), "{commands}");
    let removed =
        http.send(http.request(reqwest::Method::DELETE, &format!("/v1/deployments/{id}?remove_volumes=true"))).await?;
    assert_eq!(removed.0, 200, "{}", removed.1);
    assert_eq!(removed.1["desiredState"], "DESIRED_STATE_REMOVED");
    Ok(())
}
