//! The DigitalOcean provider against a local stand-in of DigitalOcean's v2 droplet endpoints
//! that checks every request the way DigitalOcean documents it.

mod stand_in;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flotilla::DropletId;
use flotilla_control_plane::{
    fleet::provisioning::digitalocean::{ApiToken, DigitalOcean, DigitalOceanConfig},
    fleet::provisioning::provider::{Backoff, CloudId, CreateSpec, Provider, ProviderError},
};
use serde_json::Value;
use stand_in::{Fault, Route, StandIn};

const TOKEN: &str = "dop_v1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const SSH_KEY: &str = "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45";
const VPC: &str = "760e09ef-dc84-11e8-981e-3cfdfeaae000";

fn config(standin: &StandIn, token: &str) -> DigitalOceanConfig {
    let mut config = DigitalOceanConfig::new(ApiToken::new(token), "fra1", "s-1vcpu-1gb", "ubuntu-24-04-x64");
    config.base_url = standin.url.clone();
    config.ssh_keys = vec![SSH_KEY.into()];
    config.vpc_uuid = Some(VPC.into());
    config.extra_tags = vec!["env:test".into()];
    config.request_timeout = Duration::from_secs(2);
    config.max_attempts = 4;
    config.backoff = Backoff { initial: Duration::from_millis(5), max: Duration::from_millis(50) };
    config.max_rate_limit_wait = Duration::from_secs(5);
    config.poll_interval = Duration::from_millis(10);
    config.active_timeout = Duration::from_secs(2);
    config
}

fn client(config: DigitalOceanConfig) -> DigitalOcean {
    DigitalOcean::new(config).expect("a DigitalOcean client")
}

fn spec() -> CreateSpec {
    CreateSpec {
        droplet: DropletId::new(),
        account: "team-7".into(),
        name: "flotilla-web-1".into(),
        user_data: "#cloud-config\nusers: []\n".into(),
        agent_env: vec![],
        agent_image: "flotilla-agent:test".into(),
    }
}

#[tokio::test]
async fn creates_waits_until_active_and_reads_both_addresses() {
    let standin = StandIn::start(TOKEN).await;
    standin.active_after(Some(3));
    let provider = client(config(&standin, TOKEN));
    let spec = spec();

    let id = provider.create(&spec).await.expect("create");
    let addresses = provider.wait_active(&id).await.expect("active");

    assert_eq!(addresses.public_ipv4, Some("203.0.113.10".parse().expect("ip")));
    assert_eq!(addresses.private_ipv4, Some("10.110.0.5".parse().expect("ip")));
    assert_eq!(standin.droplets(), vec![id.0.parse::<u64>().expect("numeric id")]);
    let calls: Vec<(String, String)> = standin.requests().into_iter().map(|r| (r.method, r.path)).collect();
    let get = ("GET".to_owned(), format!("/v2/droplets/{id}"));
    assert_eq!(calls, [("POST".to_owned(), "/v2/droplets".to_owned()), get.clone(), get.clone(), get]);
    assert_eq!(standin.violations(), Vec::<String>::new());

    let create = standin.requests().into_iter().find(|r| r.route == Some(Route::Create)).expect("the create");
    let body = create.body.expect("a JSON body");
    assert_eq!(body["name"], "flotilla-web-1");
    assert_eq!((body["region"].as_str(), body["size"].as_str()), (Some("fra1"), Some("s-1vcpu-1gb")));
    assert_eq!(body["image"], "ubuntu-24-04-x64");
    assert_eq!(body["ssh_keys"], serde_json::json!([SSH_KEY]));
    assert_eq!(body["vpc_uuid"], VPC);
    assert_eq!(body["user_data"], spec.user_data);
    let tags: Vec<&str> = body["tags"].as_array().expect("tags").iter().filter_map(Value::as_str).collect();
    let droplet_tag = format!("flotilla:droplet:{}", spec.droplet);
    assert_eq!(tags, ["flotilla", "flotilla:account:team-7", droplet_tag.as_str(), "env:test"]);
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_not_retried() {
    let standin = StandIn::start(TOKEN).await;
    let provider = client(config(&standin, "dop_v1_wrong"));

    let err = provider.create(&spec()).await.expect_err("a wrong token");
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err}");
    assert!(!err.is_retryable());
    let err = provider.wait_active(&CloudId("3164444".into())).await.expect_err("a wrong token");
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err}");
    assert_eq!((standin.count(Route::Create), standin.count(Route::Get)), (1, 1));
    assert!(standin.droplets().is_empty());
}

#[tokio::test]
async fn a_rate_limited_create_waits_as_told_then_succeeds() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Create, Fault::RateLimited { retry_after: Some(1) }, 1);
    let provider = client(config(&standin, TOKEN));

    let started = Instant::now();
    provider.create(&spec()).await.expect("create after the rate limit");

    assert!(started.elapsed() >= Duration::from_millis(950), "retry-after: 1 honoured: {:?}", started.elapsed());
    let statuses: Vec<u16> = standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 202], "a 429 is refused before anything is made, so the create is simply sent again");
    assert_eq!(standin.droplets().len(), 1);
}

#[tokio::test]
async fn a_rate_limit_too_long_to_wait_for_is_returned_to_the_caller() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Create, Fault::RateLimited { retry_after: Some(3600) }, 1);
    let provider = client(config(&standin, TOKEN));

    let err = provider.create(&spec()).await.expect_err("an hour is too long");
    assert_eq!(err, ProviderError::RateLimited { retry_after: Some(Duration::from_secs(3600)) });
    assert!(err.is_retryable());
    assert_eq!(standin.count(Route::Create), 1);
}

#[tokio::test]
async fn server_errors_and_rate_limits_on_get_are_retried() {
    let standin = StandIn::start(TOKEN).await;
    standin.active_after(Some(1));
    let provider = client(config(&standin, TOKEN));
    let id = provider.create(&spec()).await.expect("create");
    standin.fail(Route::Get, Fault::ServerError, 2);
    standin.fail(Route::Get, Fault::RateLimited { retry_after: None }, 1);

    provider.wait_active(&id).await.expect("active after two 500s and a 429");

    let statuses: Vec<u16> =
        standin.requests().iter().filter(|r| r.route == Some(Route::Get)).map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 429, 200]);
}

#[tokio::test]
async fn server_errors_past_the_attempt_limit_are_unavailable() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Get, Fault::ServerError, 10);
    let provider = client(config(&standin, TOKEN));

    let err = provider.wait_active(&CloudId("3164444".into())).await.expect_err("always 500");
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err}");
    assert_eq!(standin.count(Route::Get), 4, "max_attempts");
}

#[tokio::test]
async fn a_slow_answer_times_out() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Get, Fault::Slow(Duration::from_secs(10)), 2);
    let mut config = config(&standin, TOKEN);
    config.request_timeout = Duration::from_millis(200);
    config.max_attempts = 2;
    let provider = client(config);

    let started = Instant::now();
    let err = provider.wait_active(&CloudId("3164444".into())).await.expect_err("slower than the timeout");

    assert!(matches!(err, ProviderError::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(standin.count(Route::Get), 2);
}

#[tokio::test]
async fn a_droplet_that_never_becomes_active_times_out_and_the_cleanup_destroys_it() {
    let standin = StandIn::start(TOKEN).await;
    standin.active_after(None);
    let mut config = config(&standin, TOKEN);
    config.active_timeout = Duration::from_millis(300);
    let provider: Arc<dyn Provider> = Arc::new(client(config));
    let spec = spec();

    let id = provider.create(&spec).await.expect("create");
    let err = provider.wait_active(&id).await.expect_err("never active");
    assert!(matches!(&err, ProviderError::Timeout { what, .. } if what.contains(&id.0)), "{err}");
    assert!(standin.count(Route::Get) >= 2, "it polled");

    // The caller's clean-up: everything made for this droplet, found by its tag, deleted.
    let found = provider.find(spec.droplet).await.expect("find");
    assert_eq!(found, vec![id.clone()]);
    for id in &found {
        provider.delete(id).await.expect("delete");
    }
    assert!(standin.droplets().is_empty());
    assert_eq!(standin.count(Route::Delete), 1);
    // Deleting again finds it gone, which counts as deleted.
    provider.delete(&id).await.expect("a droplet already gone is deleted");
    assert_eq!(standin.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_adopts_the_droplet_instead_of_making_another() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Create, Fault::ServerErrorAfterCreate, 1);
    let provider = client(config(&standin, TOKEN));
    let spec = spec();

    let id = provider.create(&spec).await.expect("create");

    assert_eq!(standin.droplets(), vec![id.0.parse::<u64>().expect("numeric id")], "exactly one droplet");
    assert_eq!((standin.count(Route::Create), standin.count(Route::List)), (1, 1));
    let list = standin.requests().into_iter().find(|r| r.route == Some(Route::List)).expect("the lookup");
    let tag = format!("tag_name=flotilla%3Adroplet%3A{}", spec.droplet);
    assert!(list.query.contains(&tag), "looked up by the droplet's own tag: {}", list.query);
}

#[tokio::test]
async fn a_create_that_failed_before_making_anything_is_sent_again() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Create, Fault::ServerError, 1);
    let provider = client(config(&standin, TOKEN));

    provider.create(&spec()).await.expect("create");

    assert_eq!(standin.droplets().len(), 1);
    let routes: Vec<_> = standin.requests().iter().map(|r| (r.route, r.status)).collect();
    assert_eq!(routes, [(Some(Route::Create), 500), (Some(Route::List), 200), (Some(Route::Create), 202)]);
}

#[tokio::test]
async fn a_create_is_not_resent_when_the_lookup_cannot_tell() {
    let standin = StandIn::start(TOKEN).await;
    standin.fail(Route::Create, Fault::ServerError, 1);
    standin.fail(Route::List, Fault::ServerError, 10);
    let provider = client(config(&standin, TOKEN));

    let err = provider.create(&spec()).await.expect_err("cannot tell whether it was made");
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err}");
    assert_eq!(standin.count(Route::Create), 1, "never posted blind");
}

#[tokio::test]
async fn requests_digitalocean_would_refuse_are_stopped_before_sending() {
    let standin = StandIn::start(TOKEN).await;
    let provider = client(config(&standin, TOKEN));

    for (name, account, user_data) in [
        ("web_1", "team-7", "#cloud-config\n".to_owned()),
        ("web-1-", "team-7", "#cloud-config\n".to_owned()),
        ("web-1", "team 7", "#cloud-config\n".to_owned()),
        ("web-1", "team-7", "x".repeat(64 * 1024 + 1)),
    ] {
        let spec = CreateSpec { name: name.into(), account: account.into(), user_data, ..spec() };
        let err = provider.create(&spec).await.expect_err("invalid");
        assert!(matches!(err, ProviderError::Invalid { .. }), "{name} {account}: {err}");
    }
    assert!(standin.requests().is_empty());
    let err = provider.delete(&CloudId("not-a-number".into())).await.expect_err("not an id");
    assert!(matches!(err, ProviderError::Invalid { field: "cloud_id", .. }), "{err}");
}

#[tokio::test]
async fn the_stand_in_refuses_bodies_that_break_digitaloceans_schema() {
    let standin = StandIn::start(TOKEN).await;
    let http = reqwest_client();
    let url = format!("{}/v2/droplets", standin.url);
    let good =
        serde_json::json!({"name": "web-1", "region": "fra1", "size": "s-1vcpu-1gb", "image": "ubuntu-24-04-x64"});
    let mut cases = vec![];
    for (key, value) in [
        ("name", Value::Null),
        ("name", "-".into()),
        ("name", "web_1".into()),
        ("name", "a".repeat(256).into()),
        ("image", true.into()),
        ("tags", serde_json::json!(["has space"])),
        ("ssh_keys", serde_json::json!([1.5])),
        ("user_data", "x".repeat(64 * 1024 + 1).into()),
        ("ipv6", "yes".into()),
        ("nmae", "typo".into()),
    ] {
        let mut body = good.clone();
        if value.is_null() {
            body.as_object_mut().expect("object").remove(key);
        } else {
            body[key] = value;
        }
        cases.push((key, body));
    }
    for (key, body) in cases {
        let response = http.post(&url).bearer_auth(TOKEN).json(&body).send().await.expect("send");
        assert_eq!(response.status().as_u16(), 422, "{key}");
        let headers = response.headers().clone();
        let error: Value = response.json().await.expect("an error body");
        assert_eq!(error["id"], "unprocessable_entity", "{key}");
        assert!(error["message"].as_str().is_some_and(|m| m.contains(key)), "{key}: {error}");
        assert!(headers.contains_key("ratelimit-reset"), "{key}");
    }
    let response = http.post(&url).bearer_auth(TOKEN).body(good.to_string()).send().await.expect("send");
    assert_eq!(response.status().as_u16(), 400, "a body without Content-Type: application/json");
    let response = http.post(&url).bearer_auth(TOKEN).json(&good).send().await.expect("send");
    assert_eq!(response.status().as_u16(), 202);
    assert!(standin.violations().len() >= 11);
}

fn reqwest_client() -> reqwest::Client {
    // Plain HTTP to the stand-in, but reqwest still wants a TLS provider to exist.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("captured logs").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_token_never_reaches_debug_output_or_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let standin = StandIn::start(TOKEN).await;
    standin.active_after(Some(1));
    standin.fail(Route::Create, Fault::ServerErrorAfterCreate, 1);
    standin.fail(Route::Get, Fault::ServerError, 1);
    let provider = client(config(&standin, TOKEN));
    let id = provider.create(&spec()).await.expect("create");
    provider.wait_active(&id).await.expect("active");
    provider.delete(&id).await.expect("delete");
    let wrong = client(config(&standin, TOKEN.replace("dop", "bad").as_str()));
    let err = wrong.create(&spec()).await.expect_err("unauthorized");

    let logs = String::from_utf8(captured.0.lock().expect("captured logs").clone()).expect("utf-8 logs");
    assert!(logs.contains("retrying DigitalOcean request") && logs.contains("adopted"), "logs captured:\n{logs}");
    let secret = &TOKEN["dop_v1_".len()..];
    for shown in [logs, format!("{provider:?}"), format!("{wrong:?}"), format!("{err:?} {err}")] {
        assert!(!shown.contains(secret), "the token leaked into: {shown}");
    }
    assert!(format!("{provider:?}").contains("<redacted>"));
}
