//! Between Fleet API messages and the domain's values: the one place that builds them.

use chrono::{DateTime, Utc};
use flotilla::proto::{self, ContainerStatus, Droplet, EnrollmentToken, HostFacts, HostLoad, ProtocolVersion};
use futures::{Stream, StreamExt as _};
use prost::Message as _;
use tonic::Status;
use uuid::Uuid;

use crate::{
    fleet::{commands::Options, deployments::DeploymentView, events},
    identity::enrollment,
    store::{self, CommandRow, DesiredState, DropletRow, DropletStatus},
};

pub fn key_to_proto(row: store::KeyRow) -> proto::ApiKey {
    proto::ApiKey {
        id: row.id.to_string(),
        account: row.account,
        name: row.name,
        scope: row.scope,
        prefix: row.prefix,
        created_at: Some(timestamp(row.created_at)),
        expires_at: row.expires_at.map(timestamp),
        revoked_at: row.revoked_at.map(timestamp),
        last_used_at: row.last_used_at.map(timestamp),
    }
}

pub fn token_to_proto(row: store::TokenRow) -> EnrollmentToken {
    use proto::enrollment_token::State as S;
    let state = if row.revoked_at.is_some() {
        S::Revoked
    } else if row.used_at.is_some() {
        S::Used
    } else if row.expires_at <= Utc::now() {
        S::Expired
    } else {
        S::Usable
    };
    EnrollmentToken {
        id: row.id.to_string(),
        account: row.account,
        droplet_id: row.droplet_id.to_string(),
        name: row.name,
        created_at: Some(timestamp(row.created_at)),
        expires_at: Some(timestamp(row.expires_at)),
        used_at: row.used_at.map(timestamp),
        revoked_at: row.revoked_at.map(timestamp),
        state: state as i32,
    }
}

pub fn status_from_proto(status: proto::DropletStatus) -> DropletStatus {
    use proto::DropletStatus as P;
    match status {
        P::Pending | P::Unspecified => DropletStatus::Pending,
        P::Provisioning => DropletStatus::Provisioning,
        P::Online => DropletStatus::Online,
        P::Unreachable => DropletStatus::Unreachable,
        P::Offline => DropletStatus::Offline,
        P::Error => DropletStatus::Error,
        P::Deleting => DropletStatus::Deleting,
    }
}

fn status_to_proto(status: &str) -> proto::DropletStatus {
    use proto::DropletStatus as P;
    match DropletStatus::parse(status) {
        Some(DropletStatus::Pending) => P::Pending,
        Some(DropletStatus::Provisioning) => P::Provisioning,
        Some(DropletStatus::Online) => P::Online,
        Some(DropletStatus::Unreachable) => P::Unreachable,
        Some(DropletStatus::Offline) => P::Offline,
        Some(DropletStatus::Error) => P::Error,
        Some(DropletStatus::Deleting) => P::Deleting,
        None => P::Unspecified,
    }
}

/// An instant as the API writes it.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    std::time::SystemTime::from(at).into()
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn unsigned32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

pub fn droplet_to_proto(row: DropletRow) -> Droplet {
    Droplet {
        id: row.id.to_string(),
        account: row.account,
        status: status_to_proto(&row.status) as i32,
        status_message: row.status_message,
        agent_version: row.agent_version,
        host: Some(HostFacts {
            hostname: row.hostname,
            os: row.os,
            kernel_version: row.kernel_version,
            architecture: row.architecture,
            cpu_count: unsigned32(row.cpu_count),
            memory_total_bytes: unsigned(row.memory_total_bytes),
            disk_total_bytes: unsigned(row.disk_total_bytes),
        }),
        docker_version: row.docker_version,
        load: Some(HostLoad {
            load_average_1m: row.load_average_1m,
            load_average_5m: row.load_average_5m,
            load_average_15m: row.load_average_15m,
            memory_used_bytes: unsigned(row.memory_used_bytes),
            disk_used_bytes: unsigned(row.disk_used_bytes),
            disk_free_bytes: unsigned(row.disk_free_bytes),
            container_count: unsigned32(row.container_count),
        }),
        created_at: Some(timestamp(row.created_at)),
        connected_at: row.connected_at.map(timestamp),
        last_seen_at: row.last_seen_at.map(timestamp),
        disconnected_at: row.disconnected_at.map(timestamp),
        labels: row.labels.0.into_iter().collect(),
        protocol: Some(ProtocolVersion {
            major: unsigned32(row.protocol_major),
            minor: unsigned32(row.protocol_minor),
        }),
        provider: row.provider,
        cloud_id: row.cloud_id.unwrap_or_default(),
        public_ipv4: row.public_ipv4,
        private_ipv4: row.private_ipv4,
    }
}

/// The API's view of a command.
pub fn command_to_proto(row: &CommandRow) -> proto::CommandRecord {
    use proto::command_record::State as S;
    let state = match row.state.as_str() {
        "queued" => S::Queued,
        "sent" => S::Sent,
        "acked" => S::Acked,
        "succeeded" => S::Succeeded,
        "failed" => S::Failed,
        "expired" => S::Expired,
        "cancelled" => S::Cancelled,
        _ => S::Unspecified,
    };
    let ts = |t: Option<DateTime<Utc>>| t.map(timestamp);
    proto::CommandRecord {
        id: row.id.to_string(),
        droplet_id: row.droplet_id.to_string(),
        deployment_id: row.deployment_id.map(|d| d.to_string()).unwrap_or_default(),
        kind: row.kind.clone(),
        state: state as i32,
        message: row.message.clone(),
        result: row.result.as_deref().and_then(|b| ContainerStatus::decode(b).ok()),
        attempts: u32::try_from(row.attempts).unwrap_or(0),
        idempotency_key: row.idempotency_key.clone().unwrap_or_default(),
        requested_by: row.requested_by.clone(),
        deadline: ts(row.deadline),
        created_at: ts(Some(row.created_at)),
        sent_at: ts(row.sent_at),
        acked_at: ts(row.acked_at),
        finished_at: ts(row.finished_at),
    }
}

/// A deployment as the API answers it.
pub fn deployment_to_proto(view: DeploymentView) -> proto::Deployment {
    use proto::deployment::DesiredState as D;
    let desired = match view.desired {
        Some(DesiredState::Running) => D::Running,
        Some(DesiredState::Stopped) => D::Stopped,
        Some(DesiredState::Removed) => D::Removed,
        None => D::Unspecified,
    };
    let id = |id: Option<Uuid>| id.map(|id| id.to_string()).unwrap_or_default();
    proto::Deployment {
        id: id(view.id),
        droplet_id: view.droplet.to_string(),
        account: view.account,
        name: view.name,
        generation: view.generation,
        desired_state: desired as i32,
        spec: Some(view.spec),
        container: view.container,
        created_at: view.created_at.map(timestamp),
        updated_at: view.updated_at.map(timestamp),
        last_error: view.last_error,
        failed: view.failed,
        last_command_id: id(view.last_command),
    }
}

/// What the probe found of a deployment's MCP server; empty before it found one.
pub fn tools_to_proto(found: Option<store::McpServerTools>) -> proto::ListToolsResponse {
    let Some(found) = found else { return proto::ListToolsResponse::default() };
    proto::ListToolsResponse {
        server_name: found.name,
        server_version: found.version,
        tools: found
            .tools
            .into_iter()
            .map(|tool| proto::McpTool {
                name: tool.name,
                description: tool.description,
                input_schema_json: tool.input_schema.0.to_string(),
            })
            .collect(),
        discovered_at: Some(timestamp(found.discovered_at)),
    }
}

impl TryFrom<Option<proto::CommandOptions>> for Options {
    type Error = String;

    fn try_from(options: Option<proto::CommandOptions>) -> Result<Self, String> {
        let options = options.unwrap_or_default();
        let deadline = match options.deadline {
            None => None,
            Some(t) => Some(
                DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
                    .ok_or("options.deadline: not a valid instant")?,
            ),
        };
        Options::new(options.idempotency_key, deadline)
    }
}

/// A token's time to live from the API: the default when absent.
pub fn ttl(field: &str, ttl: Option<prost_types::Duration>) -> Result<std::time::Duration, Status> {
    match ttl {
        None => Ok(enrollment::DEFAULT_TTL),
        Some(ttl) => std::time::Duration::try_from(ttl)
            .map_err(|_| Status::invalid_argument(format!("{field}: must be a positive duration"))),
    }
}

/// `WatchEvents` as the API streams it.
pub type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

/// The fleet's event stream as Fleet messages.
pub fn event_stream(events: events::EventStream) -> EventStream {
    Box::pin(events.map(|event| event.map(event_to_proto).map_err(|gone| Status::unavailable(gone.to_string()))))
}

fn event_to_proto(event: events::Event) -> proto::Event {
    let row = event.row;
    proto::Event {
        cursor: event.cursor.encode(),
        account: row.account,
        droplet_id: row.droplet_id.map(|d| d.to_string()).unwrap_or_default(),
        deployment_id: row.deployment_id.map(|d| d.to_string()).unwrap_or_default(),
        kind: row.kind,
        message: row.message,
        at: Some(timestamp(row.at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stored_status_maps_to_its_proto_value_and_back() {
        for s in ["pending", "provisioning", "online", "unreachable", "offline", "error", "deleting"] {
            let status = DropletStatus::parse(s).expect(s);
            assert_eq!(status_from_proto(status_to_proto(s)), status);
        }
    }
}
