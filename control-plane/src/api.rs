//! `Fleet`: the API operators, scripts and Supabase call.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use flotilla::proto::{
    self, Droplet, GetDropletRequest, HostFacts, HostLoad, ListDropletsRequest,
    ListDropletsResponse, ProtocolVersion, fleet_server::Fleet,
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::store::{self, DropletRow, DropletStatus};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
const PAGE_TOKEN_PREFIX: &str = "droplets/after/";

pub struct FleetApi {
    db: PgPool,
}

impl FleetApi {
    pub fn new(db: PgPool) -> Self {
        Self { db }
    }
}

/// Database failures are logged here and reach the client only as `Unavailable`.
fn db_error(error: sqlx::Error) -> Status {
    tracing::error!(%error, "database error");
    Status::unavailable("the control plane's database is unavailable; try again")
}

fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value)
        .map_err(|_| Status::invalid_argument(format!("{field}: {value:?} is not a UUID")))
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn get_droplet(
        &self,
        request: Request<GetDropletRequest>,
    ) -> Result<Response<Droplet>, Status> {
        let id = parse_id("id", &request.get_ref().id)?;
        let row = store::get_droplet(&self.db, id).await.map_err(db_error)?;
        let row = row.ok_or_else(|| Status::not_found(format!("droplet {id} not found")))?;
        Ok(Response::new(droplet_to_proto(row)))
    }

    async fn list_droplets(
        &self,
        request: Request<ListDropletsRequest>,
    ) -> Result<Response<ListDropletsResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: at most {MAX_PAGE_SIZE}, got {n}"
                )));
            }
            n => n,
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(decode_page_token(token)?),
        };
        let status = match proto::DropletStatus::try_from(request.status) {
            Ok(proto::DropletStatus::Unspecified) => None,
            Ok(status) => Some(status_from_proto(status)),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "status: {} is not a droplet status",
                    request.status
                )));
            }
        };
        // One more than asked tells whether another page follows.
        let mut rows = store::list_droplets(&self.db, after, status, i64::from(page_size) + 1)
            .await
            .map_err(db_error)?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => encode_page_token(last.id),
            _ => String::new(),
        };
        Ok(Response::new(ListDropletsResponse {
            droplets: rows.into_iter().map(droplet_to_proto).collect(),
            next_page_token,
        }))
    }
}

/// Page tokens are opaque to clients: keyset positions, so pages stay stable while rows
/// are added.
fn encode_page_token(after: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{after}"))
}

fn decode_page_token(token: &str) -> Result<Uuid, Status> {
    let invalid = || Status::invalid_argument("page_token: not a token this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(invalid)?;
    Uuid::try_parse(id).map_err(|_| invalid())
}

fn status_from_proto(status: proto::DropletStatus) -> DropletStatus {
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

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::new_v4();
        assert_eq!(decode_page_token(&encode_page_token(id)).ok(), Some(id));
        for bad in [
            "",
            "!!!",
            "ZHJvcGxldHM",
            &URL_SAFE_NO_PAD.encode("droplets/after/nope"),
        ] {
            let status = decode_page_token(bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with("page_token"));
        }
    }

    #[test]
    fn every_stored_status_maps_to_its_proto_value_and_back() {
        for s in [
            "pending",
            "provisioning",
            "online",
            "unreachable",
            "offline",
            "error",
            "deleting",
        ] {
            let status = DropletStatus::parse(s).expect(s);
            assert_eq!(status_from_proto(status_to_proto(s)), status);
        }
    }
}
