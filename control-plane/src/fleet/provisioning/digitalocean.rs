//! DigitalOcean's v2 API: `POST /v2/droplets`, `GET /v2/droplets/{id}`,
//! `GET /v2/droplets?tag_name=`, `DELETE /v2/droplets/{id}`.
//!
//! Retries, and why they are safe:
//! - GET and DELETE are idempotent: retried on 429 (after `retry-after`, else
//!   `ratelimit-reset`), 5xx, timeouts and lost connections. A DELETE that meets 404 is done.
//! - POST (create) is not idempotent: DigitalOcean would make a second droplet. It is retried
//!   at once only when the request cannot have been acted on (429, or a connection that never
//!   opened). After an ambiguous failure (5xx, timeout, connection lost mid-request) the
//!   client first lists droplets by the droplet's unique `flotilla:droplet:<uuid>` tag and
//!   adopts one it finds; it posts again only when none is there. The list may lag a create
//!   by moments, so a duplicate is unlikely but possible: it carries the same tag, and the
//!   caller's clean-up (`find`, then `delete` each) removes it.

use std::{
    fmt,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde::{Deserialize, Serialize};

use super::provider::{Addresses, Backoff, CloudId, CreateSpec, Provider, ProviderError};
use crate::fleet::provisioning::cloudinit::MAX_USER_DATA;
use flotilla::DropletId;

/// DigitalOcean's API.
pub const DEFAULT_BASE_URL: &str = "https://api.digitalocean.com";
/// The tag every droplet Flotilla makes carries.
pub const FLOTILLA_TAG: &str = "flotilla";

/// A DigitalOcean API token. It is never printed: `Debug` redacts it and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// How the client reaches DigitalOcean and what every droplet it makes gets.
#[derive(Debug, Clone)]
pub struct DigitalOceanConfig {
    /// `https://api.digitalocean.com`, or a stand-in in tests.
    pub base_url: String,
    pub token: ApiToken,
    /// Region slug, e.g. `fra1`.
    pub region: String,
    /// Size slug, e.g. `s-1vcpu-1gb`.
    pub size: String,
    /// Image slug or id, e.g. `ubuntu-24-04-x64`.
    pub image: String,
    /// SSH key fingerprints (or ids) put on root, for break-glass access.
    pub ssh_keys: Vec<String>,
    pub vpc_uuid: Option<String>,
    /// Tags added to every droplet besides `flotilla`, the account and the droplet id.
    pub extra_tags: Vec<String>,
    /// One HTTP request, from connect to the last byte of the answer.
    pub request_timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// The longest rate-limit wait honoured inside a call; a longer one is returned as
    /// `RateLimited` for the caller to schedule.
    pub max_rate_limit_wait: Duration,
    /// How often `wait_active` asks, and for how long in all.
    pub poll_interval: Duration,
    pub active_timeout: Duration,
}

impl DigitalOceanConfig {
    /// A config with DigitalOcean's base URL and defaults that suit it.
    pub fn new(token: ApiToken, region: impl Into<String>, size: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.into(),
            token,
            region: region.into(),
            size: size.into(),
            image: image.into(),
            ssh_keys: Vec::new(),
            vpc_uuid: None,
            extra_tags: Vec::new(),
            request_timeout: Duration::from_secs(30),
            max_attempts: 5,
            backoff: Backoff { initial: Duration::from_millis(500), max: Duration::from_secs(30) },
            max_rate_limit_wait: Duration::from_secs(60),
            poll_interval: Duration::from_secs(5),
            active_timeout: Duration::from_secs(300),
        }
    }
}

/// The DigitalOcean provider. A cheap-`Clone` handle; its `Debug` never shows the token.
#[derive(Clone)]
pub struct DigitalOcean {
    inner: Arc<Inner>,
}

struct Inner {
    config: DigitalOceanConfig,
    http: reqwest::Client,
    base_url: String,
}

impl fmt::Debug for DigitalOcean {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.inner.config;
        f.debug_struct("DigitalOcean")
            .field("base_url", &self.inner.base_url)
            .field("token", &"<redacted>")
            .field("region", &c.region)
            .field("size", &c.size)
            .field("image", &c.image)
            .finish_non_exhaustive()
    }
}

/// What went wrong on one attempt, and whether the cloud may have acted on it.
struct Failure {
    error: ProviderError,
    /// The request may have reached DigitalOcean and been carried out.
    ambiguous: bool,
}

#[derive(Serialize)]
struct CreateBody<'a> {
    name: &'a str,
    region: &'a str,
    size: &'a str,
    image: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    ssh_keys: &'a [String],
    tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vpc_uuid: Option<&'a str>,
    user_data: &'a str,
}

#[derive(Deserialize)]
struct DropletEnvelope {
    droplet: Droplet,
}

#[derive(Deserialize)]
struct DropletList {
    droplets: Vec<Droplet>,
}

#[derive(Deserialize)]
struct Droplet {
    id: u64,
    status: String,
    #[serde(default)]
    networks: Networks,
}

#[derive(Deserialize, Default)]
struct Networks {
    #[serde(default)]
    v4: Vec<NetworkV4>,
}

#[derive(Deserialize)]
struct NetworkV4 {
    ip_address: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
}

impl DigitalOcean {
    /// A client for `config`. TLS uses rustls with ring and the system's root certificates.
    pub fn new(config: DigitalOceanConfig) -> Result<Self, ProviderError> {
        let invalid = |message: String| ProviderError::Invalid { field: "config", message };
        if config.max_attempts == 0 {
            return Err(invalid("max_attempts must be at least 1".into()));
        }
        for tag in &config.extra_tags {
            check_tag(tag)?;
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system certificate rustls cannot read is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.request_timeout)
            .user_agent(concat!("flotilla-control-plane/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(format!("HTTP client: {e}")))?;
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        Ok(Self { inner: Arc::new(Inner { config, http, base_url }) })
    }

    /// The tag that names one Flotilla droplet; unique, so it finds a lost create.
    pub fn droplet_tag(droplet: DropletId) -> String {
        format!("flotilla:droplet:{droplet}")
    }

    fn config(&self) -> &DigitalOceanConfig {
        &self.inner.config
    }

    /// One HTTP exchange, classified. `Ok` only for 2xx.
    async fn attempt(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&CreateBody<'_>>,
    ) -> Result<Vec<u8>, Failure> {
        let url = format!("{}{path}", self.inner.base_url);
        let mut request = self.inner.http.request(method, &url).bearer_auth(&self.config().token.0).query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Err(transport_failure(&e, self.config().request_timeout, path)),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Err(transport_failure(&e, self.config().request_timeout, path)),
        };
        if status.is_success() {
            return Ok(body.to_vec());
        }
        let api: ApiError = serde_json::from_slice(&body)
            .unwrap_or_else(|_| ApiError { id: String::new(), message: String::from_utf8_lossy(&body).into_owned() });
        let error = match status {
            StatusCode::UNAUTHORIZED => ProviderError::Unauthorized { message: api.message },
            StatusCode::NOT_FOUND => ProviderError::NotFound { what: path.to_owned() },
            StatusCode::TOO_MANY_REQUESTS => ProviderError::RateLimited { retry_after: retry_after(&headers) },
            s if s.is_server_error() => ProviderError::Unavailable { message: format!("{s}: {}", api.message) },
            s => ProviderError::Refused { status: s.as_u16(), id: api.id, message: api.message },
        };
        Err(Failure { ambiguous: status.is_server_error(), error })
    }

    /// How long to wait before the next attempt, or `None` to give up with this error.
    fn wait_before_retry(&self, error: &ProviderError, retry: u32) -> Option<Duration> {
        if retry + 1 >= self.config().max_attempts {
            return None;
        }
        match error {
            ProviderError::RateLimited { retry_after } => {
                let wait = retry_after.unwrap_or_else(|| self.config().backoff.delay(retry));
                (wait <= self.config().max_rate_limit_wait).then_some(wait)
            }
            e if e.is_retryable() => Some(self.config().backoff.delay(retry)),
            _ => None,
        }
    }

    /// GET or DELETE, retried while the error is transient.
    async fn idempotent(&self, method: Method, path: &str, query: &[(&str, &str)]) -> Result<Vec<u8>, ProviderError> {
        let mut retry = 0;
        loop {
            match self.attempt(method.clone(), path, query, None).await {
                Ok(body) => return Ok(body),
                Err(Failure { error, .. }) => match self.wait_before_retry(&error, retry) {
                    Some(wait) => {
                        tracing::debug!(%method, path, retry, ?wait, error = %error, "retrying DigitalOcean request");
                        tokio::time::sleep(wait).await;
                        retry += 1;
                    }
                    None => return Err(error),
                },
            }
        }
    }

    async fn get_droplet(&self, id: &CloudId) -> Result<Droplet, ProviderError> {
        let body = self.idempotent(Method::GET, &format!("/v2/droplets/{}", numeric(id)?), &[]).await?;
        Ok(parse::<DropletEnvelope>(&body)?.droplet)
    }

    async fn do_create(&self, spec: &CreateSpec) -> Result<CloudId, ProviderError> {
        let config = self.config();
        check_name(&spec.name)?;
        if spec.user_data.len() > MAX_USER_DATA {
            return Err(ProviderError::Invalid {
                field: "user_data",
                message: format!("{} bytes; DigitalOcean takes at most {MAX_USER_DATA}", spec.user_data.len()),
            });
        }
        let mut tags = vec![
            FLOTILLA_TAG.to_owned(),
            format!("flotilla:account:{}", spec.account),
            Self::droplet_tag(spec.droplet),
        ];
        tags.extend(config.extra_tags.iter().cloned());
        for tag in &tags {
            check_tag(tag)?;
        }
        let body = CreateBody {
            name: &spec.name,
            region: &config.region,
            size: &config.size,
            image: &config.image,
            ssh_keys: &config.ssh_keys,
            tags,
            vpc_uuid: config.vpc_uuid.as_deref(),
            user_data: &spec.user_data,
        };
        let mut retry = 0;
        loop {
            let failure = match self.attempt(Method::POST, "/v2/droplets", &[], Some(&body)).await {
                Ok(answer) => {
                    let id = CloudId(parse::<DropletEnvelope>(&answer)?.droplet.id.to_string());
                    tracing::info!(droplet_id = %spec.droplet, cloud_id = %id, "DigitalOcean droplet created");
                    return Ok(id);
                }
                Err(failure) => failure,
            };
            let wait = self.wait_before_retry(&failure.error, retry);
            tracing::warn!(
                droplet_id = %spec.droplet, retry, ambiguous = failure.ambiguous, error = %failure.error,
                "DigitalOcean create failed"
            );
            if failure.ambiguous {
                // It may have been made: look before posting again (after the back-off, so a
                // droplet that was made has had a moment to appear in the list).
                tokio::time::sleep(wait.unwrap_or(config.backoff.initial)).await;
                if let Some(id) = self.do_find(spec.droplet).await?.into_iter().next() {
                    tracing::info!(droplet_id = %spec.droplet, cloud_id = %id, "adopted a droplet whose create answer was lost");
                    return Ok(id);
                }
                if wait.is_none() {
                    return Err(failure.error);
                }
            } else {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => return Err(failure.error),
                }
            }
            retry += 1;
        }
    }

    async fn do_wait_active(&self, id: &CloudId) -> Result<Addresses, ProviderError> {
        let config = self.config();
        let poll = async {
            let mut interval = tokio::time::interval(config.poll_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let droplet = self.get_droplet(id).await?;
                match droplet.status.as_str() {
                    "active" => return Ok(addresses(&droplet.networks)),
                    "new" => {}
                    other => {
                        return Err(ProviderError::Protocol {
                            message: format!("droplet {id} is {other:?} while waiting for it to become active"),
                        });
                    }
                }
            }
        };
        tokio::time::timeout(config.active_timeout, poll).await.unwrap_or_else(|_| {
            Err(ProviderError::Timeout { what: format!("droplet {id} to become active"), after: config.active_timeout })
        })
    }

    async fn do_delete(&self, id: &CloudId) -> Result<(), ProviderError> {
        match self.idempotent(Method::DELETE, &format!("/v2/droplets/{}", numeric(id)?), &[]).await {
            Ok(_) | Err(ProviderError::NotFound { .. }) => {
                tracing::info!(cloud_id = %id, "DigitalOcean droplet deleted");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn do_find(&self, droplet: DropletId) -> Result<Vec<CloudId>, ProviderError> {
        let tag = Self::droplet_tag(droplet);
        let body = self.idempotent(Method::GET, "/v2/droplets", &[("tag_name", &tag), ("per_page", "200")]).await?;
        let mut ids: Vec<u64> = parse::<DropletList>(&body)?.droplets.into_iter().map(|d| d.id).collect();
        ids.sort_unstable();
        Ok(ids.into_iter().map(|id| CloudId(id.to_string())).collect())
    }
}

impl Provider for DigitalOcean {
    fn create<'a>(&'a self, spec: &'a CreateSpec) -> BoxFuture<'a, Result<CloudId, ProviderError>> {
        Box::pin(self.do_create(spec))
    }

    fn wait_active<'a>(&'a self, id: &'a CloudId) -> BoxFuture<'a, Result<Addresses, ProviderError>> {
        Box::pin(self.do_wait_active(id))
    }

    fn delete<'a>(&'a self, id: &'a CloudId) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.do_delete(id))
    }

    fn find(&self, droplet: DropletId) -> BoxFuture<'_, Result<Vec<CloudId>, ProviderError>> {
        Box::pin(self.do_find(droplet))
    }
}

/// An answer body as `T`, or a `Protocol` error that says what did not fit.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::Protocol { message: format!("DigitalOcean's answer: {e}") })
}

fn transport_failure(e: &reqwest::Error, timeout: Duration, path: &str) -> Failure {
    if e.is_timeout() {
        let error = ProviderError::Timeout { what: format!("DigitalOcean request {path}"), after: timeout };
        return Failure { error, ambiguous: true };
    }
    // A connection that never opened carried no request: safe to send again, even a create.
    let ambiguous = !e.is_connect();
    // The URL in the message carries no secret: the token travels in a header.
    let message = format!("DigitalOcean request {path}: {}", flotilla::telemetry::error_chain(e));
    Failure { error: ProviderError::Unavailable { message }, ambiguous }
}

/// `retry-after` (seconds) when given, else `ratelimit-reset` (Unix seconds) from now.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    if let Some(seconds) = number("retry-after") {
        return Some(Duration::from_secs(seconds));
    }
    let reset = SystemTime::UNIX_EPOCH + Duration::from_secs(number("ratelimit-reset")?);
    Some(reset.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn addresses(networks: &Networks) -> Addresses {
    let find =
        |kind: &str| networks.v4.iter().filter(|n| n.kind == kind).find_map(|n| n.ip_address.parse::<Ipv4Addr>().ok());
    Addresses { public_ipv4: find("public"), private_ipv4: find("private") }
}

fn numeric(id: &CloudId) -> Result<u64, ProviderError> {
    id.0.parse::<u64>().ok().filter(|&n| n >= 1).ok_or_else(|| ProviderError::Invalid {
        field: "cloud_id",
        message: format!("{:?} is not a DigitalOcean droplet id (a positive integer)", id.0),
    })
}

/// DigitalOcean's droplet-name pattern `^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$`, 255 at most.
pub fn check_name(name: &str) -> Result<(), ProviderError> {
    let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    check("name", name, ok, "letters, digits, '.' and '-', ending in a letter or digit")
}

/// DigitalOcean's tag names: letters, digits, `:`, `-` and `_`, 255 at most.
pub fn check_tag(tag: &str) -> Result<(), ProviderError> {
    let ok = tag.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_".contains(&b));
    check("tags", tag, ok, "letters, digits, ':', '-' and '_'")
}

/// 1 to 255 characters that satisfy `ok`, or an `Invalid` error saying `rule`.
fn check(field: &'static str, value: &str, ok: bool, rule: &str) -> Result<(), ProviderError> {
    if ok && !value.is_empty() && value.len() <= 255 {
        Ok(())
    } else {
        Err(ProviderError::Invalid { field, message: format!("{value:?}: {rule}, 255 at most") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_digitaloceans_pattern() {
        for good in ["web-1", "a", "example.com", "-x1", "1.2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "web_1", "web-", "web 1", "wéb", &"a".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_follow_digitaloceans_rules() {
        let tag = DigitalOcean::droplet_tag(DropletId::new());
        assert!(check_tag(&tag).is_ok(), "{tag}");
        for bad in ["", "a b", "a.b", "a/b", &"a".repeat(256)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_prefers_the_header_then_the_reset_time() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        let soon = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs() + 30;
        headers.insert("ratelimit-reset", soon.to_string().parse().expect("header"));
        let wait = retry_after(&headers).expect("from the reset time");
        assert!(wait > Duration::from_secs(28) && wait <= Duration::from_secs(30), "{wait:?}");
        headers.insert("retry-after", "2".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn addresses_come_from_networks_v4() {
        let networks: Networks = serde_json::from_str(
            r#"{"v4": [{"ip_address": "10.1.0.2", "type": "private", "netmask": "255.255.0.0", "gateway": null},
                       {"ip_address": "203.0.113.5", "type": "public", "netmask": "255.255.255.0", "gateway": "203.0.113.1"}],
                "v6": []}"#,
        )
        .expect("networks");
        let got = addresses(&networks);
        assert_eq!(got.public_ipv4, Some(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(got.private_ipv4, Some(Ipv4Addr::new(10, 1, 0, 2)));
    }

    #[test]
    fn debug_hides_the_token() -> Result<(), ProviderError> {
        let config = DigitalOceanConfig::new(ApiToken::new("dop_v1_secret"), "fra1", "s-1vcpu-1gb", "ubuntu-24-04-x64");
        assert!(!format!("{config:?}").contains("dop_v1_secret"));
        let client = DigitalOcean::new(config)?;
        assert!(!format!("{client:?}").contains("dop_v1_secret"));
        Ok(())
    }
}
