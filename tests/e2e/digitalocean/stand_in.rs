//! A local stand-in for the DigitalOcean v2 droplet endpoints the provider uses.
//!
//! It checks what DigitalOcean checks, written by hand from DigitalOcean's published OpenAPI
//! description (digitalocean/openapi, `droplets_create`, `droplets_get`, `droplets_list`,
//! `droplets_destroy`): method and path, `Authorization: Bearer <token>`, `Content-Type`, and
//! each create body against the schema (required `name`, `size`, `image`; the name pattern
//! `^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$` and 255 at most; field types; tag names as the
//! Tags API allows them; `user_data` at most 64 KiB). It answers in DigitalOcean's shapes:
//! 202 `{"droplet": ..}`, 200, 204, errors as `{"id", "message"}` with `ratelimit-*` headers.
//! Tests script faults per route: 429s, 500s, slow answers, droplets that never become active.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// Which endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Create,
    Get,
    List,
    Delete,
}

/// What the stand-in does instead of (or before) answering normally.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429; `retry_after` adds a `retry-after` header (seconds) to the `ratelimit-*` ones.
    RateLimited { retry_after: Option<u64> },
    /// 500 before doing anything.
    ServerError,
    /// Create the droplet, then answer 500: the answer is lost, the droplet exists.
    ServerErrorAfterCreate,
    /// Wait this long, then answer normally.
    Slow(Duration),
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub route: Option<Route>,
    pub method: String,
    pub path: String,
    pub query: String,
    /// 0 while the answer is still being made.
    pub status: u16,
    pub body: Option<Value>,
}

#[derive(Debug, Clone)]
struct Droplet {
    id: u64,
    name: String,
    region: String,
    size: String,
    image: Value,
    tags: Vec<String>,
    vpc_uuid: Option<String>,
    gets: u32,
    active: bool,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    droplets: BTreeMap<u64, Droplet>,
    faults: HashMap<Route, VecDeque<Fault>>,
    /// GETs of a droplet before it turns active; `None`: never.
    active_after: Option<u32>,
    requests: Vec<Recorded>,
    violations: Vec<String>,
}

struct Shared {
    token: String,
    // A std Mutex: no lock is held across an await.
    inner: Mutex<Inner>,
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Serves on 127.0.0.1:0 and accepts `token`. Droplets turn active on their second GET.
    pub async fn start(token: &str) -> Self {
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            inner: Mutex::new(Inner { next_id: 3_164_444, active_after: Some(2), ..Inner::default() }),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stand-in");
        let addr: SocketAddr = listener.local_addr().expect("the stand-in's address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url: format!("http://{addr}"), shared, task }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().expect("stand-in state")
    }

    /// The next `times` requests to `route` meet `fault`.
    pub fn fail(&self, route: Route, fault: Fault, times: usize) {
        self.inner().faults.entry(route).or_default().extend(std::iter::repeat_n(fault, times));
    }

    /// Droplets turn active on their `gets`-th GET; `None`: never.
    pub fn active_after(&self, gets: Option<u32>) {
        self.inner().active_after = gets;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner().requests.clone()
    }

    pub fn count(&self, route: Route) -> usize {
        self.inner().requests.iter().filter(|r| r.route == Some(route)).count()
    }

    /// Every way a request broke DigitalOcean's rules, in order.
    pub fn violations(&self) -> Vec<String> {
        self.inner().violations.clone()
    }

    /// Ids of the droplets that exist.
    pub fn droplets(&self) -> Vec<u64> {
        self.inner().droplets.keys().copied().collect()
    }
}

fn epoch_seconds() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn answer(status: StatusCode, body: Option<Value>) -> Response {
    let mut response = match body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    };
    let headers = response.headers_mut();
    headers.insert("ratelimit-limit", HeaderValue::from_static("5000"));
    headers.insert("ratelimit-remaining", HeaderValue::from_static("4816"));
    headers.insert("ratelimit-reset", HeaderValue::from(epoch_seconds() + 60));
    response
}

fn error(status: StatusCode, id: &str, message: &str) -> Response {
    answer(status, Some(json!({"id": id, "message": message})))
}

fn route_of(method: &Method, path: &str) -> Option<(Route, Option<u64>)> {
    let id = path.strip_prefix("/v2/droplets/").map(|rest| rest.parse::<u64>().ok().filter(|&n| n >= 1));
    match (method.as_str(), path, id) {
        ("POST", "/v2/droplets", _) => Some((Route::Create, None)),
        ("GET", "/v2/droplets", _) => Some((Route::List, None)),
        ("GET", _, Some(Some(id))) => Some((Route::Get, Some(id))),
        ("DELETE", _, Some(Some(id))) => Some((Route::Delete, Some(id))),
        _ => None,
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or("").to_owned();
    let json_body = serde_json::from_slice::<Value>(&body).ok();
    let route = route_of(&method, &path);
    // Recorded on arrival, so a test sees a request the stand-in is still answering slowly.
    let index = {
        let mut inner = shared.inner.lock().expect("stand-in state");
        inner.requests.push(Recorded {
            route: route.map(|(r, _)| r),
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            status: 0,
            body: json_body,
        });
        inner.requests.len() - 1
    };
    let response = respond(&shared, route, &method, &path, &query, &headers, &body).await;
    shared.inner.lock().expect("stand-in state").requests[index].status = response.status().as_u16();
    response
}

async fn respond(
    shared: &Shared,
    route: Option<(Route, Option<u64>)>,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let violation = |message: String| {
        shared.inner.lock().expect("stand-in state").violations.push(message);
    };
    let Some((route, id)) = route else {
        violation(format!("{method} {path}: not an endpoint the provider should use"));
        return error(StatusCode::NOT_FOUND, "not_found", "The resource you requested could not be found.");
    };
    let expected = format!("Bearer {}", shared.token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Unable to authenticate you");
    }
    if route == Route::Create {
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.starts_with("application/json") {
            violation(format!("POST {path}: Content-Type {content_type:?}, not application/json"));
            return error(StatusCode::BAD_REQUEST, "bad_request", "Content-Type must be application/json");
        }
    } else if !body.is_empty() {
        violation(format!("{method} {path}: a body on a request that takes none"));
    }

    let fault = shared.inner.lock().expect("stand-in state").faults.get_mut(&route).and_then(VecDeque::pop_front);
    match fault {
        Some(Fault::RateLimited { retry_after }) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", "API rate limit exceeded.");
            let headers = response.headers_mut();
            headers.insert("ratelimit-remaining", HeaderValue::from_static("0"));
            headers.insert("ratelimit-reset", HeaderValue::from(epoch_seconds() + 1));
            if let Some(seconds) = retry_after {
                headers.insert("retry-after", HeaderValue::from(seconds));
            }
            return response;
        }
        Some(Fault::ServerError) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "Unexpected server-side error");
        }
        Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::ServerErrorAfterCreate) | None => {}
    }

    let mut inner = shared.inner.lock().expect("stand-in state");
    match (route, id) {
        (Route::Create, _) => {
            let request: Value = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(e) => {
                    inner.violations.push(format!("create: the body is not JSON: {e}"));
                    return error(StatusCode::BAD_REQUEST, "bad_request", "The request body is not valid JSON");
                }
            };
            let problems = check_create(&request);
            if !problems.is_empty() {
                let message = problems.join("; ");
                inner.violations.push(format!("create: {message}"));
                return error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable_entity", &message);
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let text = |key: &str| request.get(key).and_then(Value::as_str).map(str::to_owned);
            let droplet = Droplet {
                id,
                name: text("name").unwrap_or_default(),
                region: text("region").unwrap_or_else(|| "nyc3".into()),
                size: text("size").unwrap_or_default(),
                image: request.get("image").cloned().unwrap_or(Value::Null),
                tags: request
                    .get("tags")
                    .and_then(Value::as_array)
                    .map(|t| t.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default(),
                vpc_uuid: text("vpc_uuid"),
                gets: 0,
                active: false,
            };
            let shown = droplet_json(&droplet);
            inner.droplets.insert(id, droplet);
            if matches!(fault, Some(Fault::ServerErrorAfterCreate)) {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "Unexpected server-side error");
            }
            let links = json!({"actions": [{"id": 7515, "rel": "create", "href": format!("https://api.digitalocean.com/v2/actions/{id}")}]});
            answer(StatusCode::ACCEPTED, Some(json!({"droplet": shown, "links": links})))
        }
        (Route::Get, Some(id)) => {
            let active_after = inner.active_after;
            let Some(droplet) = inner.droplets.get_mut(&id) else {
                return error(StatusCode::NOT_FOUND, "not_found", "The resource you requested could not be found.");
            };
            droplet.gets += 1;
            droplet.active = active_after.is_some_and(|n| droplet.gets >= n);
            answer(StatusCode::OK, Some(json!({"droplet": droplet_json(droplet)})))
        }
        (Route::List, _) => {
            let mut tag = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let value = percent_decode(value);
                match key {
                    "tag_name" => tag = Some(value),
                    "per_page" if value.parse::<u32>().is_ok_and(|n| (1..=200).contains(&n)) => {}
                    "page" if value.parse::<u32>().is_ok_and(|n| n >= 1) => {}
                    _ => inner.violations.push(format!("list: query parameter {key}={value:?} is not allowed")),
                }
            }
            let droplets: Vec<Value> = inner
                .droplets
                .values()
                .filter(|d| tag.as_ref().is_none_or(|t| d.tags.contains(t)))
                .map(droplet_json)
                .collect();
            let total = droplets.len();
            answer(StatusCode::OK, Some(json!({"droplets": droplets, "links": {}, "meta": {"total": total}})))
        }
        (Route::Delete, Some(id)) => match inner.droplets.remove(&id) {
            Some(_) => answer(StatusCode::NO_CONTENT, None),
            None => error(StatusCode::NOT_FOUND, "not_found", "The resource you requested could not be found."),
        },
        (Route::Get | Route::Delete, None) => {
            error(StatusCode::NOT_FOUND, "not_found", "The resource you requested could not be found.")
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The create body against `droplets_create`'s "Single Droplet Request" schema.
fn check_create(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(object) = body.as_object() else {
        return vec!["the body is not a JSON object".into()];
    };
    for required in ["name", "size", "image"] {
        if !object.contains_key(required) {
            problems.push(format!("{required} is required"));
        }
    }
    if object.contains_key("names") {
        problems.push("names is for creating several droplets; the provider makes one".into());
    }
    for (key, value) in object {
        let ok = match key.as_str() {
            "name" => value.as_str().is_some_and(valid_name),
            "region" | "size" | "vpc_uuid" => value.is_string(),
            "image" => value.is_string() || value.is_i64(),
            "ssh_keys" => value.as_array().is_some_and(|keys| keys.iter().all(|k| k.is_string() || k.is_i64())),
            "tags" => {
                value.is_null()
                    || value.as_array().is_some_and(|tags| tags.iter().all(|t| t.as_str().is_some_and(valid_tag)))
            }
            "user_data" => value.as_str().is_some_and(|u| u.len() <= 64 * 1024),
            "volumes" => value.as_array().is_some_and(|v| v.iter().all(Value::is_string)),
            "backups" | "ipv6" | "monitoring" | "private_networking" | "with_droplet_agent" | "public_networking" => {
                value.is_boolean()
            }
            "backup_policy" => value.is_object(),
            _ => {
                problems.push(format!("{key} is not a field of a droplet create request"));
                continue;
            }
        };
        if !ok {
            problems.push(format!("{key}: {value} does not satisfy the schema"));
        }
    }
    problems
}

/// `^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$`, at most 255 characters.
fn valid_name(name: &str) -> bool {
    name.len() <= 255
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// DigitalOcean's Tags API: `^[a-zA-Z0-9_\-\:]+$`, at most 255 characters.
fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= 255 && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_".contains(&b))
}

/// A droplet with every field `droplets_get` lists as required.
fn droplet_json(d: &Droplet) -> Value {
    let networks = if d.active {
        json!({
            "v4": [
                {"ip_address": "10.110.0.5", "netmask": "255.255.240.0", "gateway": null, "type": "private"},
                {"ip_address": "203.0.113.10", "netmask": "255.255.255.0", "gateway": "203.0.113.1", "type": "public"}
            ],
            "v6": []
        })
    } else {
        json!({"v4": [], "v6": []})
    };
    json!({
        "id": d.id,
        "name": d.name,
        "memory": 1024,
        "vcpus": 1,
        "disk": 25,
        "locked": false,
        "status": if d.active { "active" } else { "new" },
        "created_at": "2025-01-01T00:00:00Z",
        "features": [],
        "backup_ids": [],
        "next_backup_window": null,
        "snapshot_ids": [],
        "image": {"id": 7555620, "slug": d.image, "distribution": "Ubuntu", "name": "24.04 x64", "public": true},
        "volume_ids": [],
        "size": {"slug": d.size, "memory": 1024, "vcpus": 1, "disk": 25, "transfer": 1.0,
                 "price_monthly": 6.0, "price_hourly": 0.00893, "regions": [d.region], "available": true,
                 "description": "Basic"},
        "size_slug": d.size,
        "networks": networks,
        "region": {"slug": d.region, "name": d.region, "sizes": [d.size], "available": true,
                   "features": ["private_networking"]},
        "tags": d.tags,
        "vpc_uuid": d.vpc_uuid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_reads_tags() {
        assert_eq!(percent_decode("flotilla%3Adroplet%3Aab"), "flotilla:droplet:ab");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
