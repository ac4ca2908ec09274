//! What Docker says about a container, in the protocol's terms (`ContainerStatus`).

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use flotilla::proto::{ContainerState, ContainerStatus, Health, HealthStatus, PublishedPort};

use crate::labels;

/// What Docker says about a container, in the protocol's terms.
pub fn status_of(found: &ContainerInspectResponse) -> ContainerStatus {
    let labels = found.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
    let state = found.state.as_ref();
    let container_state = match state.and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
        Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
        Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited,
        Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
        Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
        _ => ContainerState::Unspecified,
    };
    let health = state.and_then(|s| s.health.as_ref()).and_then(|h| h.status).map(|status| HealthStatus {
        health: match status {
            HealthStatusEnum::STARTING => Health::Starting,
            HealthStatusEnum::HEALTHY => Health::Healthy,
            HealthStatusEnum::UNHEALTHY => Health::Unhealthy,
            _ => Health::Unspecified,
        } as i32,
        detail: "the image's HEALTHCHECK".into(),
        ..Default::default()
    });
    let ports = found
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(key, bindings)| {
            let (port, protocol) = key.split_once('/').map_or((key.as_str(), "tcp"), |(p, proto)| (p, proto));
            let container_port: u32 = port.parse().unwrap_or(0);
            let protocol = protocol.to_owned();
            bindings.unwrap_or_default().into_iter().map(move |b| PublishedPort {
                container_port,
                host_port: b.host_port.and_then(|p| p.parse().ok()).unwrap_or(0),
                protocol: protocol.clone(),
                host_ip: b.host_ip.unwrap_or_default(),
            })
        })
        .collect();
    ContainerStatus {
        deployment_id: labels.get(labels::DEPLOYMENT).cloned().unwrap_or_default(),
        generation: labels.get(labels::GENERATION).and_then(|g| g.parse().ok()).unwrap_or(0),
        container_id: found.id.clone().unwrap_or_default(),
        name: found.name.clone().unwrap_or_default().trim_start_matches('/').to_owned(),
        image: found.config.as_ref().and_then(|c| c.image.clone()).unwrap_or_default(),
        state: container_state as i32,
        health,
        restart_count: found.restart_count.and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
        ports,
        started_at: state
            .and_then(|s| s.started_at.as_deref())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .filter(|t| t.timestamp() > 0)
            .map(|t| prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }),
        exit_code: state.and_then(|s| s.exit_code).filter(|_| container_state == ContainerState::Exited),
        mcp_server: None,
    }
}
