//! The fleet API as HTTP/JSON, on the same port as gRPC.
//!
//! One definition, two transports: an HTTP request is turned into the gRPC request of its
//! route (path and query parameters, and the JSON body, read with the proto3 JSON mapping
//! from the descriptors in `proto/`), then handed to the very same `Fleet` service in
//! process, so authentication, validation and errors cannot differ between the two. The
//! answer goes back as proto3 JSON, as grpcurl prints it (lowerCamelCase names, default
//! values left out); a gRPC error becomes an HTTP status with a JSON body
//! `{code, message, details}`; a server stream becomes Server-Sent Events.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::response::{
    IntoResponse, Response,
    sse::{Event, KeepAlive, Sse},
};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tonic::{Code, Status};
use tower::ServiceExt as _;

pub mod routes;

pub use routes::{MAX_BODY, ROUTES, Route};

use crate::{api::grpc::FleetApi, session::registry::Sessions, store};

type FleetService = flotilla::proto::fleet_server::FleetServer<FleetApi>;

/// The HTTP side of the API port.
pub struct Http {
    fleet: FleetService,
    methods: Vec<(Route, MethodDescriptor)>,
    db: PgPool,
    sessions: Sessions,
}

impl Http {
    pub fn new(fleet: FleetService, db: PgPool, sessions: Sessions) -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(flotilla::proto::FILE_DESCRIPTOR_SET)?;
        let service = pool
            .get_service_by_name("flotilla.v1.Fleet")
            .ok_or_else(|| anyhow::anyhow!("the descriptor set has no flotilla.v1.Fleet"))?;
        let methods = ROUTES
            .iter()
            .map(|route| {
                let method = service
                    .methods()
                    .find(|m| m.name() == route.rpc)
                    .ok_or_else(|| anyhow::anyhow!("route {} names no RPC {}", route.path, route.rpc))?;
                Ok((route.clone(), method))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { fleet, methods, db, sessions })
    }

    /// `grpc` (the gRPC services by path) with the rest of the API port added: health,
    /// readiness, and every other path to the REST routes.
    pub fn router(self: Arc<Self>, grpc: axum::Router) -> axum::Router {
        let (ready, scraped, counted) = (self.clone(), self.clone(), self.clone());
        grpc.route("/healthz", axum::routing::get(|| async { axum::Json(json!({"status": "ok"})) }))
            .route("/readyz", axum::routing::get(move || async move { ready.readyz().await }))
            .route("/metrics", axum::routing::get(move || async move { scraped.metrics().await }))
            .route("/openapi.json", crate::api::openapi::route())
            .fallback(move |request: axum::extract::Request| async move { self.handle(request).await })
            .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move { counted.count(request, next).await }
            }))
    }

    async fn metrics(&self) -> Response {
        let (droplets, open) = match store::fleet_counts(&self.db).await {
            Ok(counts) => counts,
            Err(err) => {
                tracing::warn!(error = %err, "metrics: the database does not answer");
                return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "the database does not answer");
            }
        };
        match crate::metrics::get().render(droplets, &open, self.sessions.len()) {
            Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
            Err(err) => {
                tracing::error!(error = %err, "metrics: could not encode");
                error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "the metrics could not be encoded")
            }
        }
    }

    /// Counts every request by route and outcome: gRPC by method and status name (a
    /// status sent in trailers after a stream began counts as OK), HTTP by route pattern
    /// and status.
    async fn count(&self, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
        let grpc =
            request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let route = if grpc {
            request.uri().path().to_owned()
        } else {
            let path = request.uri().path();
            match self
                .methods
                .iter()
                .find(|(route, _)| route.method == request.method() && matches(route.path, path).is_some())
            {
                Some((route, _)) => format!("{} {}", route.method, route.path),
                None if matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json") => format!("GET {path}"),
                None => "other".to_owned(),
            }
        };
        // Everything logged while the request is served carries its id.
        let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let span = tracing::info_span!("request", request_id = %id, %route);
        let response = tracing::Instrument::instrument(next.run(request), span).await;
        let code = if grpc {
            let code = Status::from_header_map(response.headers()).map_or(Code::Ok, |s| s.code());
            code_name(code).to_owned()
        } else {
            response.status().as_u16().to_string()
        };
        crate::metrics::get().request(&route, &code);
        response
    }

    /// Ready when the database answers and has every migration this binary knows.
    async fn readyz(&self) -> Response {
        let latest = store::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied = store::applied_migration(&self.db).await;
        match applied {
            Ok(Some(version)) if version >= latest => axum::Json(json!({"status": "ready"})).into_response(),
            Ok(version) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                &format!("the database has migrations up to {version:?}; this control plane needs {latest}"),
            ),
            Err(err) => {
                tracing::warn!(error = %err, "readiness: the database does not answer");
                error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "the database does not answer")
            }
        }
    }

    async fn handle(&self, request: axum::extract::Request) -> Response {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        let mut allowed = Vec::new();
        let mut found = None;
        for (route, method) in &self.methods {
            if let Some(params) = matches(route.path, path) {
                if route.method == parts.method {
                    found = Some((route, method, params));
                    break;
                }
                allowed.push(route.method.as_str());
            }
        }
        let Some((route, method, params)) = found else {
            if allowed.is_empty() {
                return error(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("no route {} {path}", parts.method));
            }
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                &format!("{path} answers {}", allowed.join(", ")),
            );
            if let Ok(allow) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            return response;
        };
        let fields = match self.fields(route, method, &params, parts.uri.query(), &parts.headers, body).await {
            Ok(fields) => fields,
            Err(response) => return *response,
        };
        // No field takes a NUL character and PostgreSQL's text cannot hold one: refuse it
        // here, not as a database failure (503). Found by schemathesis (tests/e2e/openapi.rs).
        if let Some(field) = nul_in(&fields) {
            return error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &format!("{field}: contains a NUL character"));
        }
        let input = match DynamicMessage::deserialize_with_options(
            method.input(),
            Value::Object(fields),
            &DeserializeOptions::new().deny_unknown_fields(true),
        ) {
            Ok(input) => input,
            Err(problem) => return error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &format!("request: {problem}")),
        };
        let response = match self.call(route.rpc, &parts, input.encode_to_vec()).await {
            Ok(response) => response,
            Err(status) => return status_response(&status),
        };
        if method.is_server_streaming() {
            return sse(response, method.output());
        }
        unary(response, method.output()).await
    }

    /// The request's fields as one JSON object: path parameters, then the query or body.
    async fn fields(
        &self,
        route: &Route,
        method: &MethodDescriptor,
        params: &[(&str, String)],
        query: Option<&str>,
        headers: &HeaderMap,
        body: axum::body::Body,
    ) -> Result<Map<String, Value>, Box<Response>> {
        let bad = |message: String| Box::new(error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &message));
        let input = method.input();
        let mut fields = if matches!(route.method, Method::POST | Method::PUT) {
            read_json(headers, body).await?
        } else {
            from_query(&input, query.unwrap_or("")).map_err(bad)?
        };
        // An EventSource reconnecting says where it was with `Last-Event-ID`.
        if let (Some(field), Some(last)) = (input.get_field_by_name("cursor"), headers.get("last-event-id"))
            && !fields.contains_key(field.name())
            && !fields.contains_key(field.json_name())
            && let Ok(last) = last.to_str()
        {
            fields.insert(field.json_name().to_owned(), Value::String(last.to_owned()));
        }
        for (name, value) in params {
            let field = input.get_field_by_name(name).ok_or_else(|| bad(format!("{name}: not a field")))?;
            for key in [field.name(), field.json_name()] {
                if let Some(given) = fields.remove(key)
                    && given != Value::String(value.clone())
                {
                    return Err(bad(format!("{name}: the path says {value:?} but the body says {given}")));
                }
            }
            fields.insert(field.json_name().to_owned(), Value::String(value.clone()));
        }
        Ok(fields)
    }

    /// Calls the gRPC service in process with the request's credentials and request id.
    async fn call(
        &self,
        rpc: &str,
        parts: &http::request::Parts,
        message: Vec<u8>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        let mut framed = BytesMut::with_capacity(message.len() + 5);
        framed.put_u8(0);
        framed.put_u32(u32::try_from(message.len()).map_err(|_| Status::invalid_argument("request: too large"))?);
        framed.put_slice(&message);
        let mut request = http::Request::builder()
            .method(Method::POST)
            .uri(format!("/flotilla.v1.Fleet/{rpc}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers");
        for name in [header::AUTHORIZATION.as_str(), "x-request-id"] {
            if let Some(value) = parts.headers.get(name) {
                request = request.header(name, value);
            }
        }
        let mut request = request
            .body(tonic::body::Body::new(Full::new(framed.freeze())))
            .map_err(|_| Status::invalid_argument("request: cannot be passed on"))?;
        // The caller's address, for the audit trail (`requested_by`).
        if let Some(info) = parts.extensions.get::<tonic::transport::server::TcpConnectInfo>() {
            request.extensions_mut().insert(info.clone());
        }
        if let Some(info) =
            parts.extensions.get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        {
            request.extensions_mut().insert(info.clone());
        }
        let response = match self.fleet.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        // A call that fails before any message answers with its status in the headers.
        match Status::from_header_map(response.headers()) {
            Some(status) if status.code() != Code::Ok => Err(status),
            _ => Ok(response),
        }
    }
}

/// The path parameters when `path` matches `pattern`.
fn matches<'p>(pattern: &'p str, path: &str) -> Option<Vec<(&'p str, String)>> {
    let mut params = Vec::new();
    let mut want = pattern.trim_start_matches('/').split('/');
    let mut have = path.trim_start_matches('/').split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(params),
            (Some(want), Some(have)) => match want.strip_prefix('{').and_then(|w| w.split_once('}')) {
                Some((name, suffix)) => {
                    let value = have.strip_suffix(suffix)?;
                    // `{id}` alone must not swallow `<id>:verb`.
                    if value.is_empty() || (suffix.is_empty() && value.contains(':')) {
                        return None;
                    }
                    let value = percent_encoding::percent_decode_str(value).decode_utf8().ok()?;
                    params.push((name, value.into_owned()));
                }
                None if want == have => {}
                None => return None,
            },
            _ => return None,
        }
    }
}

/// Query parameters as JSON values of their fields' types (proto names or JSON names).
fn from_query(input: &MessageDescriptor, query: &str) -> Result<Map<String, Value>, String> {
    let mut fields = Map::new();
    for (name, raw) in form_urlencoded::parse(query.as_bytes()) {
        let field = input
            .get_field_by_name(&name)
            .or_else(|| input.get_field_by_json_name(&name))
            .ok_or_else(|| format!("{name}: not a parameter of this call"))?;
        let value = query_value(&field, &raw)?;
        let key = field.json_name().to_owned();
        if field.is_list() {
            match fields.entry(key).or_insert_with(|| Value::Array(Vec::new())) {
                Value::Array(values) => values.push(value),
                _ => return Err(format!("{name}: given twice")),
            }
        } else if fields.insert(key, value).is_some() {
            return Err(format!("{name}: given twice"));
        }
    }
    Ok(fields)
}

fn query_value(field: &FieldDescriptor, raw: &str) -> Result<Value, String> {
    let name = field.name();
    Ok(match field.kind() {
        Kind::Bool => match raw {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(format!("{name}: {raw:?} is not true or false")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            let n: i64 = raw.parse().map_err(|_| format!("{name}: {raw:?} is not a whole number"))?;
            Value::from(n)
        }
        Kind::Float | Kind::Double => {
            let n: f64 = raw.parse().map_err(|_| format!("{name}: {raw:?} is not a number"))?;
            Value::from(n)
        }
        // 64-bit integers, strings, bytes, enums, timestamps and durations are strings
        // in proto3 JSON.
        _ => Value::String(raw.to_owned()),
    })
}

/// The first field (a dotted path) whose string value, or key, holds a NUL character.
fn nul_in(fields: &Map<String, Value>) -> Option<String> {
    fields.iter().find_map(|(key, value)| {
        let inner = if key.contains('\0') { Some(String::new()) } else { nul_at(value) };
        inner.map(|path| format!("{key}{path}"))
    })
}

fn nul_at(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then(String::new),
        Value::Object(map) => nul_in(map).map(|path| format!(".{path}")),
        Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, item)| nul_at(item).map(|path| format!("[{i}]{path}")))
        }
        _ => None,
    }
}

/// The JSON object of a request body (an empty body is an empty object).
async fn read_json(headers: &HeaderMap, body: axum::body::Body) -> Result<Map<String, Value>, Box<Response>> {
    if let Some(kind) = headers.get(header::CONTENT_TYPE) {
        let kind = kind.to_str().unwrap_or_default();
        if !kind.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json") {
            return Err(Box::new(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "INVALID_ARGUMENT",
                &format!("content-type: {kind:?}; send application/json"),
            )));
        }
    }
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "INVALID_ARGUMENT",
                &format!("body: larger than {MAX_BODY} bytes"),
            )));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(Box::new(error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "body: must be a JSON object"))),
        Err(problem) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("body: not valid JSON: {problem}"),
        ))),
    }
}

/// Reads gRPC messages out of a response body as its frames arrive.
struct Frames {
    body: tonic::body::Body,
    buffer: BytesMut,
    done: bool,
}

enum Frame {
    Message(Bytes),
    End(Status),
}

impl Frames {
    async fn next(&mut self) -> Frame {
        loop {
            if self.buffer.len() >= 5 {
                let length = u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]);
                let length = length as usize;
                if self.buffer[0] != 0 {
                    return Frame::End(Status::internal("the service answered with a compressed message"));
                }
                if self.buffer.len() >= 5 + length {
                    self.buffer.advance(5);
                    return Frame::Message(self.buffer.split_to(length).freeze());
                }
            }
            if self.done {
                return Frame::End(Status::internal("the answer ended without a status"));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        self.done = true;
                        let status = frame
                            .into_trailers()
                            .ok()
                            .and_then(|trailers| Status::from_header_map(&trailers))
                            .unwrap_or_else(|| Status::internal("the answer's trailers carry no status"));
                        return Frame::End(status);
                    }
                },
                Some(Err(status)) => return Frame::End(status),
                None => self.done = true,
            }
        }
    }
}

fn to_json(output: &MessageDescriptor, bytes: Bytes) -> Result<Value, Status> {
    let message = DynamicMessage::decode(output.clone(), bytes)
        .map_err(|_| Status::internal("the service's answer does not decode"))?;
    message
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .map_err(|_| Status::internal("the service's answer does not encode as JSON"))
}

async fn unary(response: http::Response<tonic::body::Body>, output: MessageDescriptor) -> Response {
    let mut frames = Frames { body: response.into_body(), buffer: BytesMut::new(), done: false };
    let message = match frames.next().await {
        Frame::Message(message) => message,
        Frame::End(status) => return status_response(&status),
    };
    match frames.next().await {
        Frame::End(status) if status.code() == Code::Ok => {}
        Frame::End(status) => return status_response(&status),
        Frame::Message(_) => return status_response(&Status::internal("a unary call answered twice")),
    }
    match to_json(&output, message) {
        Ok(value) => axum::Json(value).into_response(),
        Err(status) => status_response(&status),
    }
}

/// A server stream as Server-Sent Events: each message an event `message`; a failure an
/// event `error` with the same `{code, message, details}` body as an HTTP error.
fn sse(response: http::Response<tonic::body::Body>, output: MessageDescriptor) -> Response {
    let frames = Frames { body: response.into_body(), buffer: BytesMut::new(), done: false };
    let events = futures::stream::unfold(Some(frames), move |frames| {
        let output = output.clone();
        async move {
            let mut frames = frames?;
            let event = match frames.next().await {
                Frame::Message(message) => match to_json(&output, message) {
                    // A message with a cursor gives it as the event's id, for Last-Event-ID.
                    Ok(value) => match value.get("cursor").and_then(Value::as_str) {
                        Some(cursor) => Event::default().id(cursor).event("message").json_data(&value),
                        None => Event::default().event("message").json_data(&value),
                    },
                    Err(status) => {
                        return Some((Ok::<_, Infallible>(error_event(&status)), None));
                    }
                },
                Frame::End(status) if status.code() == Code::Ok => return None,
                Frame::End(status) => return Some((Ok(error_event(&status)), None)),
            };
            let event = event.unwrap_or_else(|_| error_event(&Status::internal("an event does not encode")));
            Some((Ok(event), Some(frames)))
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn error_event(status: &Status) -> Event {
    let (_, body) = status_body(status);
    Event::default().event("error").data(body.to_string())
}

/// The gRPC code's canonical name.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The HTTP status for a gRPC code, as Google's HTTP mapping has it (412 for a failed
/// precondition: the resource is not in the state the call needs).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `{code, message, details}`, and how long to wait before retrying, if the status says.
fn status_body(status: &Status) -> (Option<Duration>, Value) {
    use tonic_types::StatusExt as _;
    let details = status.get_error_details();
    let mut listed = Vec::new();
    if let Some(bad) = details.bad_request() {
        let violations: Vec<Value> =
            bad.field_violations.iter().map(|v| json!({"field": v.field, "description": v.description})).collect();
        listed.push(json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}));
    }
    let retry = details.retry_info().and_then(|r| r.retry_delay);
    if let Some(delay) = retry {
        listed.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{}.{:03}s", delay.as_secs(), delay.subsec_millis()),
        }));
    }
    (retry, json!({"code": code_name(status.code()), "message": status.message(), "details": listed}))
}

/// A gRPC status as an HTTP answer.
pub fn status_response(status: &Status) -> Response {
    let (retry, body) = status_body(status);
    let mut response = (http_status(status.code()), axum::Json(body)).into_response();
    if let Some(delay) = retry {
        let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"code": code, "message": message, "details": []}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_with_verbs_and_ids() {
        let id = "0b7c6c1e-9f3a-4a43-8a59-0c8d0f0b1c2d";
        assert_eq!(matches("/v1/deployments/{id}", &format!("/v1/deployments/{id}")), Some(vec![("id", id.into())]));
        assert_eq!(
            matches("/v1/deployments/{id}:restart", &format!("/v1/deployments/{id}:restart")),
            Some(vec![("id", id.into())])
        );
        assert_eq!(matches("/v1/deployments/{id}", &format!("/v1/deployments/{id}:restart")), None);
        assert_eq!(matches("/v1/deployments/{id}:stop", &format!("/v1/deployments/{id}:restart")), None);
        assert_eq!(matches("/v1/deployments/{id}", "/v1/deployments/"), None);
        assert_eq!(matches("/v1/deployments", "/v1/deployments/x"), None);
        assert_eq!(matches("/v1/droplets/{id}", "/v1/droplets/a%20b"), Some(vec![("id", "a b".into())]));
    }

    #[test]
    fn every_route_names_an_rpc_and_its_path_fields_exist() {
        let pool = DescriptorPool::decode(flotilla::proto::FILE_DESCRIPTOR_SET).expect("descriptors");
        let service = pool.get_service_by_name("flotilla.v1.Fleet").expect("Fleet");
        for route in ROUTES {
            let method = service.methods().find(|m| m.name() == route.rpc).expect(route.rpc);
            for segment in route.path.split('/') {
                if let Some((name, _)) = segment.strip_prefix('{').and_then(|s| s.split_once('}')) {
                    assert!(method.input().get_field_by_name(name).is_some(), "{}: {name}", route.path);
                }
            }
        }
    }

    #[test]
    fn codes_map_to_http_statuses() {
        for (code, http) in [
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::FailedPrecondition, 412),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
        ] {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
        let limited = status_response(&crate::api::auth::rate_limited(Duration::from_millis(1500)));
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("2"));
    }
}
