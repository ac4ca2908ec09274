//! The OpenAPI document of the HTTP/JSON side, made at start-up from `http::ROUTES` and
//! the message descriptors, so it cannot drift from what the routes accept.
//!
//! OpenAPI 3.1: its schemas are JSON Schema 2020-12, which says what the proto3 JSON
//! reader (prost-reflect) really accepts where 3.0 cannot: `null` for any field (it means
//! "unset"), a 64-bit integer as a string or a number (`type` lists), an enum by name or
//! number, and a description beside a `$ref`. Answers use the canonical forms only
//! (lowerCamelCase names, 64-bit integers as strings, enums by name, default values left
//! out), which the same schemas accept.

use std::collections::BTreeMap;

use axum::response::IntoResponse as _;
use http::{Method, header};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

use crate::api::http::routes::{MAX_BODY, ROUTES, Route};

const UUID: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
const OPTIONAL_UUID: &str = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$";

/// `GET /openapi.json`: the document, made once when the router is built.
pub fn route() -> axum::routing::MethodRouter {
    let body = bytes::Bytes::from(document().to_string());
    axum::routing::get(move || {
        let body = body.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
    })
}

/// The OpenAPI 3.1 document of every route in `http::ROUTES`.
pub fn document() -> Value {
    let service = DescriptorPool::decode(flotilla::proto::FILE_DESCRIPTOR_SET)
        .ok()
        .and_then(|pool| pool.get_service_by_name("flotilla.v1.Fleet"));
    let mut schemas = Schemas::default();
    let mut paths = Map::new();
    if let Some(service) = service {
        for route in ROUTES {
            let Some(method) = service.methods().find(|m| m.name() == route.rpc) else { continue };
            let operation = operation(route, &method, &mut schemas);
            let item = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
            item[route.method.as_str().to_ascii_lowercase()] = operation;
        }
    }
    // Open paths, without a key. Only readiness depends on the database.
    let open = |summary: &str, kind: &str, schema: Value, may_fail: bool| {
        let mut responses = json!({"200": {"description": "OK", "content": {kind: {"schema": schema}}}});
        if may_fail {
            responses["503"] = json!({"$ref": "#/components/responses/Error503"});
        }
        json!({"get": {"summary": summary, "tags": ["service"], "security": [], "responses": responses}})
    };
    let status =
        |value: &str| json!({"type": "object", "properties": {"status": {"const": value}}, "required": ["status"]});
    paths.insert("/healthz".into(), open("The process answers", "application/json", status("ok"), false));
    paths.insert(
        "/readyz".into(),
        open("The database answers and has every migration", "application/json", status("ready"), true),
    );
    paths.insert(
        "/metrics".into(),
        open("Prometheus metrics (text exposition format)", "text/plain", json!({"type": "string"}), false),
    );
    paths.insert("/openapi.json".into(), open("This document", "application/json", json!({"type": "object"}), false));

    let mut components = schemas.finish();
    components.insert("Error".into(), error_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Flotilla fleet API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The `flotilla.v1.Fleet` gRPC service as HTTP/JSON (the proto3 JSON mapping: \
                lowerCamelCase names, 64-bit integers as strings, enums by name, timestamps as RFC 3339, \
                durations as seconds with an `s`). Every `/v1` call needs `authorization: Bearer <API key>`. \
                Errors are `{code, message, details}`; server streams are Server-Sent Events.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "flk_...",
                    "description": "An API key made with `flotilla-control-plane api-key create`.",
                },
            },
            "responses": error_responses(),
        },
    })
}

/// How a call fails, by HTTP status: the statuses `http::http_status` gives.
const ERRORS: &[(&str, &str)] = &[
    ("400", "The request is malformed or a field is invalid (INVALID_ARGUMENT); `details` names each bad field."),
    ("401", "No API key, a malformed `authorization` header, or an unknown, revoked or expired key."),
    ("403", "The key's scope or account does not allow this call (PERMISSION_DENIED)."),
    ("404", "No such resource, or one of another account (NOT_FOUND: the two are not told apart)."),
    ("409", "The idempotency key was used for a different change (ALREADY_EXISTS)."),
    ("412", "The resource is not in a state that allows this call (FAILED_PRECONDITION)."),
    ("413", "The body is too large."),
    ("415", "The body is not `application/json`."),
    ("429", "Too many requests with this key; wait `Retry-After` seconds (RESOURCE_EXHAUSTED)."),
    ("503", "The control plane's database is unavailable, or it is shutting down; try again (UNAVAILABLE)."),
    ("504", "The droplet did not answer in time (DEADLINE_EXCEEDED)."),
];

fn error_responses() -> Value {
    let mut responses = Map::new();
    for (status, description) in ERRORS {
        let mut response = json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        });
        if *status == "413" {
            response["description"] = format!("The body is larger than {MAX_BODY} bytes.").into();
        }
        if *status == "429" {
            response["headers"] = json!({"Retry-After": {
                "description": "Seconds to wait before trying again.",
                "required": true,
                "schema": {"type": "integer", "minimum": 1},
            }});
        }
        responses.insert(format!("Error{status}"), response);
    }
    Value::Object(responses)
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "A failed call: the gRPC status code's name, a message for people, and `google.rpc` \
            details for programs (`BadRequest` field violations, `RetryInfo`).",
        "properties": {
            "code": {"type": "string", "description": "e.g. INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED."},
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"@type": {"type": "string"}},
                    "required": ["@type"],
                },
            },
        },
        "required": ["code", "message", "details"],
    })
}

/// One operation: parameters from the path and query (GET, DELETE) or a JSON body (POST,
/// PUT), the answer, and the errors the call can give.
fn operation(route: &Route, method: &MethodDescriptor, schemas: &mut Schemas) -> Value {
    let input = method.input();
    let path_fields: Vec<&str> = route
        .path
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{').and_then(|s| s.split_once('}')).map(|(name, _)| name))
        .collect();
    let mut parameters: Vec<Value> = path_fields
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "description": input.get_field_by_name(name).and_then(|f| comments_of_field(&f)).unwrap_or_default(),
                "schema": {"type": "string", "format": "uuid", "pattern": UUID},
            })
        })
        .collect();
    let body = matches!(route.method, Method::POST | Method::PUT);
    let mut operation = json!({
        "operationId": operation_id(route),
        "summary": route.rpc,
        "tags": [route.path.split('/').nth(2).unwrap_or("fleet")],
    });
    if let Some(description) = comments(method.parent_file().file_descriptor_proto(), method.path()) {
        operation["description"] = description.into();
    }
    if body {
        let mut schema = schemas.object(&input, &path_fields);
        if let Some(description) = comments(input.parent_file_descriptor_proto(), input.path()) {
            schema["description"] = description.into();
        }
        let required = schema.get("required").is_some();
        operation["requestBody"] = json!({
            "required": required,
            "content": {"application/json": {"schema": schema}},
        });
    } else {
        for field in input.fields().filter(|f| !path_fields.contains(&f.name())) {
            if let Some(schema) = schemas.query(&field) {
                let mut parameter = json!({"name": field.json_name(), "in": "query", "schema": schema});
                if let Some(description) = comments_of_field(&field) {
                    parameter["description"] = description.into();
                }
                parameters.push(parameter);
            }
        }
    }
    if !parameters.is_empty() {
        operation["parameters"] = parameters.into();
    }
    let output = method.output();
    schemas.want(&output);
    let answer = if method.is_server_streaming() {
        json!({
            "description": format!(
                "Server-Sent Events: each `message` event's data is one {} as JSON{}; a failure ends the \
                 stream with an `error` event whose data is an Error. Comments (`:`) keep the connection alive.",
                output.name(),
                if output.get_field_by_name("cursor").is_some() {
                    " and its id is the message's `cursor` (send it back as `Last-Event-ID` to resume)"
                } else {
                    ""
                },
            ),
            // The schema of each event (as OpenAPI 3.2's `itemSchema` would say).
            "content": {"text/event-stream": {"schema": {
                "type": "object",
                "properties": {
                    "event": {"enum": ["message", "error"]},
                    "id": {"type": "string"},
                    "data": {"type": "string", "contentMediaType": "application/json"},
                },
                "required": ["data"],
            }}},
        })
    } else {
        json!({
            "description": output.name(),
            "content": {"application/json": {"schema": {"$ref": reference(&output)}}},
        })
    };
    let mut responses = Map::new();
    responses.insert("200".into(), answer);
    for status in error_statuses(route, method) {
        responses.insert(status.into(), json!({"$ref": format!("#/components/responses/Error{status}")}));
    }
    operation["responses"] = Value::Object(responses);
    operation
}

/// The RPC's name, or for an RPC with more than one route, the name and the path's fields.
fn operation_id(route: &Route) -> String {
    if ROUTES.iter().filter(|r| r.rpc == route.rpc).count() == 1 {
        return route.rpc.to_owned();
    }
    let by: String = route
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.split_once('}')).map(|(name, _)| name))
        .flat_map(|name| name.split('_'))
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect();
    if by.is_empty() { route.rpc.to_owned() } else { format!("{}By{by}", route.rpc) }
}

/// The error statuses a route can answer with.
fn error_statuses(route: &Route, method: &MethodDescriptor) -> Vec<&'static str> {
    let input = method.input();
    let has = |name: &str| input.get_field_by_name(name).is_some();
    let names_ids = input.fields().any(|f| f.name() == "id" || f.name().ends_with("_id") || f.name() == "account");
    // Live reads need the droplet's session and its answer.
    let live = matches!(route.rpc, "InspectDeployment" | "CheckDeploymentHealth" | "TailLogs");
    let mut statuses = vec!["400", "401", "403"];
    if names_ids {
        statuses.push("404");
    }
    if has("options") {
        statuses.push("409");
    }
    if has("options") || live || matches!(route.rpc, "CreateEnrollmentToken" | "RevokeEnrollmentToken") {
        statuses.push("412");
    }
    if matches!(route.method, Method::POST | Method::PUT) {
        statuses.extend(["413", "415"]);
    }
    statuses.extend(["429", "503"]);
    if live {
        statuses.push("504");
    }
    statuses
}

fn reference(message: &MessageDescriptor) -> String {
    format!("#/components/schemas/{}", component_name(message))
}

fn component_name(message: &MessageDescriptor) -> String {
    message.full_name().replace('.', "_")
}

/// The leading comment at `path` in a file's source info, one line per line.
fn comments(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let text = text.lines().map(str::trim).collect::<Vec<_>>().join("\n");
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn comments_of_field(field: &FieldDescriptor) -> Option<String> {
    comments(field.parent_file().file_descriptor_proto(), field.path())
}

/// The message schemas named so far; `finish` makes every one of them.
#[derive(Default)]
struct Schemas {
    wanted: BTreeMap<String, MessageDescriptor>,
}

impl Schemas {
    fn want(&mut self, message: &MessageDescriptor) {
        self.wanted.entry(component_name(message)).or_insert_with(|| message.clone());
    }

    /// Every wanted message's schema, and those of the messages they name, recursively.
    fn finish(mut self) -> Map<String, Value> {
        let mut done = Map::new();
        loop {
            let Some((name, message)) =
                self.wanted.iter().find(|(name, _)| !done.contains_key(*name)).map(|(n, m)| (n.clone(), m.clone()))
            else {
                return done;
            };
            let mut schema = self.object(&message, &[]);
            if let Some(description) = comments(message.parent_file_descriptor_proto(), message.path()) {
                schema["description"] = description.into();
            }
            done.insert(name, schema);
        }
    }

    /// A message as a JSON object, less the fields in `skip` (those the path gives).
    fn object(&mut self, message: &MessageDescriptor, skip: &[&str]) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in message.fields().filter(|f| !skip.contains(&f.name())) {
            let needed = field_is_required(message, &field);
            let mut schema = self.field(&field);
            if !needed {
                schema = nullable(schema);
            }
            if let Some(description) = comments_of_field(&field) {
                let description = match schema.get("description").and_then(Value::as_str) {
                    Some(more) => format!("{description}\n{more}"),
                    None => description,
                };
                schema["description"] = description.into();
            }
            if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
                let others: Vec<String> = oneof
                    .fields()
                    .filter(|f| f.name() != field.name())
                    .map(|f| format!("`{}`", f.json_name()))
                    .collect();
                let note = format!("One of `{}`: not with {}.", oneof.name(), others.join(" or "));
                let description = match schema.get("description").and_then(Value::as_str) {
                    Some(text) => format!("{text}\n{note}"),
                    None => note,
                };
                schema["description"] = description.into();
            }
            if needed {
                required.push(Value::from(field.json_name()));
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
        if !required.is_empty() {
            schema["required"] = required.into();
        }
        // At most one field of each oneof may be set (null means unset).
        let mut exclusive = Vec::new();
        for oneof in message.oneofs().filter(|o| !o.is_synthetic()) {
            let names: Vec<String> = oneof.fields().map(|f| f.json_name().to_owned()).collect();
            for (i, a) in names.iter().enumerate() {
                for b in &names[i + 1..] {
                    let set = json!({"not": {"type": "null"}});
                    exclusive.push(json!({"required": [a, b], "properties": {a: set, b: set}}));
                }
            }
        }
        if !exclusive.is_empty() {
            schema["not"] = json!({"anyOf": exclusive});
        }
        if let Some(Value::Object(rules)) = across_fields(message) {
            if let Some(schema) = schema.as_object_mut() {
                schema.extend(rules);
            }
        }
        schema
    }

    /// A field's value (without `null`).
    fn field(&mut self, field: &FieldDescriptor) -> Value {
        if field.is_map() {
            let mut value = match field.kind() {
                Kind::Message(entry) => self.single(&entry.map_entry_value_field()),
                _ => json!({}),
            };
            refine(&mut value, field, Refine::MapValue);
            let mut schema = json!({"type": "object", "additionalProperties": value});
            refine(&mut schema, field, Refine::Map);
            return schema;
        }
        let item = self.single(field);
        if field.is_list() {
            let mut schema = json!({"type": "array", "items": item});
            refine(&mut schema, field, Refine::List);
            return schema;
        }
        item
    }

    /// One value of a field's kind.
    fn single(&mut self, field: &FieldDescriptor) -> Value {
        let mut schema = match field.kind() {
            Kind::Message(message) => match message.full_name() {
                "google.protobuf.Timestamp" => json!({
                    "type": "string",
                    "format": "date-time",
                    "description": "RFC 3339, e.g. \"2025-01-31T12:00:00Z\".",
                }),
                "google.protobuf.Duration" => json!({
                    "type": "string",
                    "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
                    "description": "Seconds with an `s`, e.g. \"1.5s\".",
                }),
                _ => {
                    self.want(&message);
                    json!({"$ref": reference(&message)})
                }
            },
            Kind::Enum(kind) => {
                let names: Vec<String> = kind.values().map(|v| v.name().to_owned()).collect();
                let numbers: Vec<i32> = kind.values().map(|v| v.number()).collect();
                json!({
                    "anyOf": [{"type": "string", "enum": names}, {"type": "integer", "enum": numbers}],
                    "description": "By name; the number is accepted too.",
                })
            }
            Kind::Bool => json!({"type": "boolean"}),
            // No string takes a NUL character (the database cannot hold one).
            Kind::String => json!({"type": "string", "pattern": NO_NUL}),
            Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
            Kind::Double | Kind::Float => json!({"type": "number"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => integer(i64::from(i32::MIN), i64::from(i32::MAX), 9),
            Kind::Uint32 | Kind::Fixed32 => integer(0, i64::from(u32::MAX), 9),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({
                    "anyOf": [
                        {"type": "string", "pattern": "^-?[0-9]{1,18}$"},
                        {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX},
                    ],
                    "description": "A decimal string; a number is accepted too.",
                })
            }
            Kind::Uint64 | Kind::Fixed64 => json!({
                "anyOf": [
                    {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    {"type": "integer", "minimum": 0, "maximum": u64::MAX},
                ],
                "description": "A decimal string; a number is accepted too.",
            }),
        };
        refine(&mut schema, field, Refine::Value);
        schema
    }

    /// A query parameter's schema, for the fields `http::from_query` reads: scalars, enums
    /// (by name), lists of them, timestamps and durations. `None` for other messages.
    fn query(&mut self, field: &FieldDescriptor) -> Option<Value> {
        if field.is_map() {
            return None;
        }
        let mut schema = match field.kind() {
            Kind::Message(message)
                if matches!(message.full_name(), "google.protobuf.Timestamp" | "google.protobuf.Duration") =>
            {
                self.single(field)
            }
            Kind::Message(_) => return None,
            Kind::Enum(kind) => {
                let names: Vec<String> = kind.values().map(|v| v.name().to_owned()).collect();
                json!({"type": "string", "enum": names})
            }
            Kind::Bool => json!({"type": "boolean"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({"type": "integer", "minimum": i32::MIN, "maximum": i32::MAX})
            }
            Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}),
            _ => self.single(field),
        };
        refine(&mut schema, field, Refine::Value);
        if field.is_list() {
            schema = json!({"type": "array", "items": schema});
        }
        Some(schema)
    }
}

/// A 32-bit integer: a number, or a decimal string of it.
fn integer(minimum: i64, maximum: i64, digits: u32) -> Value {
    let sign = if minimum < 0 { "-?" } else { "" };
    json!({
        "anyOf": [
            {"type": "integer", "minimum": minimum, "maximum": maximum},
            {"type": "string", "pattern": format!("^{sign}[0-9]{{1,{digits}}}$")},
        ],
    })
}

/// `schema`, or null: the proto3 JSON reader takes `null` as "unset".
fn nullable(mut schema: Value) -> Value {
    if let Some(value) = schema.as_object_mut().and_then(|s| s.remove("const")) {
        schema["enum"] = json!([value]);
    }
    if let Some(values) = schema.get_mut("enum").and_then(Value::as_array_mut) {
        values.push(Value::Null);
    }
    if let Some(Value::String(kind)) = schema.get("type").cloned() {
        schema["type"] = json!([kind, "null"]);
        return schema;
    }
    if let Some(any) = schema.get_mut("anyOf").and_then(Value::as_array_mut) {
        any.push(json!({"type": "null"}));
        return schema;
    }
    json!({"anyOf": [schema, {"type": "null"}]})
}

#[derive(Clone, Copy, PartialEq)]
enum Refine {
    /// One value (an item, for a list).
    Value,
    List,
    Map,
    MapValue,
}

/// Rules between fields of one message that the service checks.
fn across_fields(message: &MessageDescriptor) -> Option<Value> {
    let object = |name: &str| json!({"required": [name], "properties": {name: {"type": "object"}}});
    match message.full_name() {
        // An MCP probe (also the default probe) needs the `mcp` section.
        "flotilla.v1.DeploymentSpec" => Some(json!({
            "if": {
                "required": ["healthCheck"],
                "properties": {"healthCheck": {"type": "object", "not": {"anyOf": [object("docker"), object("http")]}}},
            },
            "then": object("mcp"),
        })),
        "flotilla.v1.RegistryAuth" => Some(json!({
            "if": {"required": ["password"], "properties": {"password": {"type": "string", "minLength": 1}}},
            "then": {"required": ["username"], "properties": {"username": {"type": "string", "minLength": 1}}},
        })),
        _ => None,
    }
}

/// Fields the service requires: a call without them is refused.
fn field_is_required(message: &MessageDescriptor, field: &FieldDescriptor) -> bool {
    matches!(
        (message.full_name(), field.name()),
        ("flotilla.v1.CreateDeploymentRequest" | "flotilla.v1.UpdateDeploymentRequest", "spec")
            | ("flotilla.v1.CreateApiKeyRequest", "scope")
            | ("flotilla.v1.DeploymentSpec", "image")
            | ("flotilla.v1.EnvVar", "name")
            | ("flotilla.v1.PortPublication", "container_port")
            | ("flotilla.v1.VolumeMount", "name" | "container_path")
            | ("flotilla.v1.McpEndpoint" | "flotilla.v1.HttpProbe", "port")
            | ("flotilla.v1.HttpProbe", "path")
    )
}

/// Whole seconds `[0-9]+` with an optional fraction, as a duration string.
const FRACTION: &str = r"(\.[0-9]{1,9})?s$";

/// A duration pattern: `whole` (alternatives for the whole seconds) with a fraction, or
/// exactly `top` seconds; with `positive`, also the fractions of a second above zero.
fn duration(whole: &str, top: u64, positive: bool) -> Value {
    let tiny = if positive { r"|^0\.[0-9]{0,8}[1-9]s$" } else { "" };
    json!({"pattern": format!("^({whole}){FRACTION}|^{top}s${tiny}")})
}

/// A regular expression for the decimal numbers from `low` to `high` (no leading zeros),
/// where `low` has fewer digits than `high`.
fn between(low: u64, high: u64) -> String {
    let (low, high) = (low.to_string(), high.to_string());
    let mut choices = Vec::new();
    // `prefix` then a digit in `from..=to` at `at`, then any digits: one choice per position.
    let mut bound = |number: &str, above: bool| {
        let digits = number.as_bytes();
        for at in 0..digits.len() {
            let digit = digits[at] - b'0';
            let last = at == digits.len() - 1;
            let (from, to) = match (above, last) {
                (true, false) => (digit + 1, 9),
                (false, false) => (u8::from(at == 0), digit.saturating_sub(1)),
                (true, true) => (digit, 9),
                (false, true) => (u8::from(at == 0 && digits.len() > 1), digit),
            };
            if (!last && ((above && digit == 9) || (!above && digit == u8::from(at == 0)))) || from > to {
                continue;
            }
            let rest = digits.len() - at - 1;
            let tail = if rest == 0 { String::new() } else { format!("[0-9]{{{rest}}}") };
            choices.push(format!("{}[{from}-{to}]{tail}", &number[..at]));
        }
    };
    bound(&low, true);
    bound(&high, false);
    // Every number with a digit count strictly between the two.
    for length in low.len() + 1..high.len() {
        choices.push(format!("[1-9][0-9]{{{}}}", length - 1));
    }
    choices.join("|")
}

const LABEL_KEY: &str = "[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?";
/// No control characters (what `char::is_control` refuses).
const PRINTABLE: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";
const NO_NUL: &str = "^[^\\u0000]*$";

/// What the service checks beyond the field's type, where a schema can say it (so that
/// what the document allows is accepted and what it forbids is refused); what it cannot
/// say (names unique in a list, a timeout within the interval) is in the descriptions.
fn refine(schema: &mut Value, field: &FieldDescriptor, what: Refine) {
    let message = field.parent_message();
    let in_request = message.name().ends_with("Request");
    let extra = match (message.name(), field.name(), what) {
        (_, "id" | "droplet_id" | "deployment_id", Refine::Value) if in_request => json!({"pattern": OPTIONAL_UUID}),
        (_, "page_size", Refine::Value) => json!({"minimum": 0, "maximum": 1000}),
        ("CreateApiKeyRequest", "scope", _) => json!({"enum": ["read", "write", "admin"]}),
        ("CreateApiKeyRequest", "account", _) => json!({"pattern": "^([a-z0-9][a-z0-9-]{0,62})?$"}),
        ("CreateApiKeyRequest", "name", _) => json!({"maxLength": 200}),
        // More than zero and at most 10 years (this says up to 99,999,999 s).
        ("CreateApiKeyRequest", "expires_in", _) => duration("[1-9][0-9]{0,7}", 99_999_999, true),
        // More than zero and at most 24 hours.
        ("CreateEnrollmentTokenRequest", "ttl", _) | ("CreateDropletRequest", "token_ttl", _) => {
            duration("[1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}", 86_400, true)
        }
        ("WaitCommandRequest", "timeout", _) => duration("[0-9]|[1-9][0-9]|[12][0-9]{2}", 300, false),
        ("StopDeploymentRequest" | "RestartDeploymentRequest", "grace", _) => {
            duration("[0-9]|[1-9][0-9]{1,2}|[12][0-9]{3}|3[0-5][0-9]{2}", 3600, false)
        }
        ("CommandOptions", "idempotency_key", _) => json!({"maxLength": 200, "pattern": PRINTABLE}),
        ("WatchEventsRequest", "kinds", Refine::Value) => json!({"pattern": "^([^*\\u0000]+|[^*\\u0000]*\\*)$"}),
        ("ListDropletsRequest", "label_selector", _) => {
            let requirement = format!(
                "\\s*(!\\s*{LABEL_KEY}|{LABEL_KEY}\\s*((!=|==?)[^,\\u0000-\\u001f\\u007f-\\u009f]{{0,255}})?)\\s*"
            );
            json!({"pattern": format!("^(\\s*|{requirement}(,{requirement})*)$")})
        }
        ("CreateDropletRequest", "provider", _) => json!({"enum": ["", "byo"]}),
        ("UpdateDropletLabelsRequest" | "CreateDropletRequest", "labels", Refine::Map) => {
            json!({"propertyNames": {"pattern": format!("^{LABEL_KEY}$")}, "maxProperties": 64})
        }
        ("UpdateDropletLabelsRequest" | "CreateDropletRequest", "labels", Refine::MapValue) => {
            json!({"maxLength": 255, "pattern": PRINTABLE})
        }
        // The deployment spec, as `flotilla::spec` checks it.
        ("DeploymentSpec", "image", _) => json!({
            "maxLength": 512,
            // A registry host (with a dot or a port, or localhost) and components, or
            // components only, the first of several without a dot; a tag; a digest.
            "pattern": format!(
                "^({registry}/{component}(/{component})*|{first}(/{component})+|{component})\
                 (:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(@sha256:[0-9a-f]{{64}})?$",
                registry = "([A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+(:[0-9]+)?|localhost(:[0-9]+)?|[A-Za-z0-9-]+:[0-9]+)",
                component = "[a-z0-9]+([._-]+[a-z0-9]+)*",
                first = "[a-z0-9]+([_-]+[a-z0-9]+)*",
            ),
        }),
        ("DeploymentSpec", "command" | "args", Refine::Value) => json!({"pattern": NO_NUL}),
        ("DeploymentSpec", "labels", Refine::Map) => {
            json!({"propertyNames": {"minLength": 1, "not": {"pattern": "^dev\\.flotilla\\."}}})
        }
        ("DeploymentSpec", "labels", Refine::MapValue) => json!({"pattern": NO_NUL}),
        ("DeploymentSpec", "privileged", _) => json!({"const": false}),
        ("DeploymentSpec", "network_mode" | "pid_mode" | "ipc_mode", _) => json!({"maxLength": 0}),
        ("DeploymentSpec", "cap_add", Refine::List) => json!({"maxItems": 0}),
        ("DeploymentSpec", "env", Refine::List) => json!({"description": "Each name at most once."}),
        ("DeploymentSpec", "ports", Refine::List) => {
            json!({"description": "Each host port (other than 0) at most once per protocol."})
        }
        ("DeploymentSpec", "working_dir", _) => json!({"pattern": "^(/[^\\u0000]*)?$"}),
        ("DeploymentSpec", "pull_policy", _) | ("PortPublication", "protocol", _) | ("RestartPolicy", "mode", _) => {
            json!({})
        }
        ("EnvVar", "name", _) => json!({"minLength": 1, "pattern": "^[^=\\u0000]+$"}),
        ("EnvVar", "value", _) => json!({"pattern": NO_NUL}),
        ("PortPublication", "container_port", _) | ("McpEndpoint" | "HttpProbe", "port", _) => {
            json!({"minimum": 1, "maximum": 65535})
        }
        ("PortPublication", "host_port", _) => json!({"minimum": 0, "maximum": 65535}),
        ("PortPublication", "bind_address", _) => {
            json!({"anyOf": [{"maxLength": 0}, {"format": "ipv4"}, {"format": "ipv6"}]})
        }
        ("VolumeMount", "name", _) => json!({"pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"}),
        ("VolumeMount", "container_path", _) => {
            json!({"pattern": "^/[^\\u0000]*$", "not": {"pattern": "docker\\.sock"}})
        }
        ("RestartPolicy", "max_retries", _) => json!({"minimum": 0, "maximum": 100}),
        ("Resources", "memory_bytes", _) => {
            // 0 (no limit), or 6 MiB to 1 TiB.
            *schema = json!({
                "anyOf": [
                    {"type": "string", "pattern": format!("^(0|{})$", between(6_291_456, 1_099_511_627_776))},
                    {"type": "integer", "enum": [0]},
                    {"type": "integer", "minimum": 6_291_456, "maximum": 1_099_511_627_776_u64},
                ],
                "description": "Bytes: 0 (no limit), or 6 MiB to 1 TiB; a decimal string (a number is accepted too).",
            });
            return;
        }
        ("Resources", "cpu_millis", _) => json!({"minimum": 0, "maximum": 256_000}),
        ("HealthCheck", "failure_threshold", _) => json!({"minimum": 0, "maximum": 100}),
        ("HealthCheck", "interval", _) => duration("[1-9]|[1-9][0-9]{1,2}|[1-2][0-9]{3}|3[0-5][0-9]{2}", 3600, false),
        ("HealthCheck", "start_period", _) => {
            duration("[0-9]|[1-9][0-9]{1,2}|[1-2][0-9]{3}|3[0-5][0-9]{2}", 3600, false)
        }
        ("HealthCheck", "timeout", _) => {
            let mut schema = duration("[1-9]|[1-9][0-9]|[12][0-9]{2}", 300, false);
            schema["description"] = "At most the interval.".into();
            schema
        }
        ("HttpProbe", "path", _) => json!({"pattern": "^/[^\\u0000]*$"}),
        ("McpEndpoint", "path", _) => json!({"pattern": "^(/[^\\u0000]*)?$"}),
        // Both 0 (200-399), or 100 <= min <= max <= 599: the order of the two is not a
        // schema's to say, so it is in the description only.
        ("HttpProbe", "expected_status_min" | "expected_status_max", _) => json!({
            "minimum": 0,
            "maximum": 599,
            "description": "Both 0 (200-399), or 100 <= min <= max <= 599.",
        }),
        _ => return,
    };
    let Value::Object(extra) = extra else { return };
    let Some(target) = schema.as_object_mut() else { return };
    // A bounded integer is documented as a number only (its string form is still read).
    if let (Some(Value::Array(any)), true) =
        (target.get_mut("anyOf"), extra.contains_key("minimum") || extra.contains_key("maximum"))
    {
        any.retain(|choice| choice["type"] == "integer");
        if let Some(choice) = any.first_mut().and_then(Value::as_object_mut) {
            choice.extend(extra);
        }
        return;
    }
    target.extend(extra);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    found.push(target.clone());
                }
                map.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_route_is_an_operation_and_every_reference_resolves() {
        let document = document();
        for route in ROUTES {
            let operation = &document["paths"][route.path][route.method.as_str().to_ascii_lowercase()];
            assert!(operation["responses"]["200"].is_object(), "{} {}", route.method, route.path);
        }
        let mut found = Vec::new();
        refs(&document, &mut found);
        assert!(!found.is_empty());
        for target in found {
            let pointer = target.trim_start_matches('#');
            assert!(document.pointer(pointer).is_some(), "{target} does not resolve");
        }
        // Recursive and nested messages have schemas of their own, with comments.
        let spec = &document["components"]["schemas"]["flotilla_v1_DeploymentSpec"];
        assert_eq!(spec["properties"]["pullPolicy"]["anyOf"][0]["enum"][3], "PULL_POLICY_NEVER");
        assert!(spec["description"].as_str().is_some_and(|d| d.starts_with("What to run")));
    }

    #[test]
    fn number_ranges_as_patterns_are_exact() {
        for (low, high) in [(6_291_456, 1_099_511_627_776_u64), (1, 10), (5, 42), (95, 1203)] {
            let pattern = format!("^({})$", between(low, high));
            let accepts = |n: u64| {
                // A tiny matcher is enough: try each choice as (literal prefix, class, count).
                pattern.trim_start_matches("^(").trim_end_matches(")$").split('|').any(|choice| {
                    let text = n.to_string();
                    let (prefix, rest) = choice.split_once('[').unwrap_or((choice, ""));
                    let Some(after) = text.strip_prefix(prefix) else { return false };
                    let (class, tail) = rest.split_once(']').unwrap_or(("", ""));
                    let (from, to) = class.split_once('-').unwrap_or(("0", "0"));
                    let count: usize = tail.trim_start_matches("[0-9]{").trim_end_matches('}').parse().unwrap_or(0);
                    let mut chars = after.chars();
                    let Some(first) = chars.next() else { return false };
                    first >= from.chars().next().unwrap_or('0')
                        && first <= to.chars().next().unwrap_or('9')
                        && chars.count() == count
                })
            };
            let probes = [low - 1, low, low + 1, high - 1, high, high + 1, (low + high) / 2, low * 10, high / 10];
            for n in probes {
                assert_eq!(accepts(n), (low..=high).contains(&n), "{n} in {low}..={high}: {pattern}");
            }
        }
    }

    #[test]
    fn path_fields_leave_the_body_and_get_fields_are_query_parameters() {
        let document = document();
        let create = &document["paths"]["/v1/droplets/{droplet_id}/deployments"]["post"];
        let body = &create["requestBody"]["content"]["application/json"]["schema"];
        assert!(body["properties"].get("dropletId").is_none());
        assert_eq!(body["required"], json!(["spec"]));
        assert_eq!(create["parameters"][0]["name"], "droplet_id");
        let list = &document["paths"]["/v1/droplets"]["get"];
        let names: Vec<&str> =
            list["parameters"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["pageSize", "pageToken", "status", "account", "labelSelector"]);
        let events = &document["paths"]["/v1/events"]["get"];
        assert!(events["responses"]["200"]["content"]["text/event-stream"].is_object());
    }
}
