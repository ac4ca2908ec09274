//! Health checks, one container at a time: the image's Docker `HEALTHCHECK`, an HTTP
//! probe, or an MCP probe that speaks MCP (`initialize`, then `tools/list` over streamable
//! HTTP, with the official Rust SDK) and is healthy only when the server answers.
//!
//! A probe's settings travel with the container as `dev.flotilla.probe.*` labels (see
//! [`crate::labels`]), so an agent that restarts picks them up again from the engine.
//! Probes reach containers at their address on the per-droplet network, so no port needs
//! publishing.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use flotilla::{
    proto::{ContainerStatus, Health, McpServer, McpTool},
    spec::{DeploymentSpec, Probe},
};
use rmcp::{ServiceExt as _, model::ClientInfo, transport::StreamableHttpClientTransport};

use crate::labels;

/// Restarts for failed health, before a container is given up on, unless the spec's
/// `on-failure` policy sets its own cap.
const DEFAULT_MAX_RESTARTS: u32 = 5;

/// How a container is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Http { port: u16, path: String, min: u16, max: u16 },
    Mcp { port: u16, path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub kind: Kind,
    pub interval: Duration,
    pub timeout: Duration,
    pub threshold: u32,
    pub start_period: Duration,
    /// Restarts for failed health before the container is stopped and reported
    /// crash-looping.
    pub max_restarts: u32,
}

fn max_restarts(spec: &DeploymentSpec) -> u32 {
    match spec.restart {
        flotilla::spec::RestartMode::OnFailure { max_retries } => max_retries,
        _ => DEFAULT_MAX_RESTARTS,
    }
}

impl ProbeSpec {
    /// The labels that carry a spec's health check, if it has one.
    pub fn labels(spec: &DeploymentSpec) -> Vec<(String, String)> {
        let Some(health) = &spec.health else { return Vec::new() };
        let ms = |d: Duration| d.as_millis().to_string();
        let mut labels = vec![
            (labels::PROBE_INTERVAL_MS.to_owned(), ms(health.interval)),
            (labels::PROBE_TIMEOUT_MS.to_owned(), ms(health.timeout)),
            (labels::PROBE_THRESHOLD.to_owned(), health.failure_threshold.to_string()),
            (labels::PROBE_START_PERIOD_MS.to_owned(), ms(health.start_period)),
            (labels::PROBE_MAX_RESTARTS.to_owned(), max_restarts(spec).to_string()),
        ];
        match &health.probe {
            Probe::Docker => labels.push((labels::PROBE.to_owned(), "docker".into())),
            Probe::Http { port, path, status_min, status_max } => labels.extend([
                (labels::PROBE.to_owned(), "http".into()),
                (labels::PROBE_PORT.to_owned(), port.to_string()),
                (labels::PROBE_PATH.to_owned(), path.clone()),
                (labels::PROBE_STATUS.to_owned(), format!("{status_min}-{status_max}")),
            ]),
            Probe::Mcp => {
                let (port, path) = spec.mcp.as_ref().map(|m| (m.port, m.path.clone())).unwrap_or((0, "/mcp".into()));
                labels.extend([
                    (labels::PROBE.to_owned(), "mcp".into()),
                    (labels::PROBE_PORT.to_owned(), port.to_string()),
                    (labels::PROBE_PATH.to_owned(), path),
                ]);
            }
        }
        labels
    }

    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Self> {
        let max_restarts =
            labels.get(labels::PROBE_MAX_RESTARTS).and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_RESTARTS);
        let number = |key: &str| labels.get(key).and_then(|v| v.parse::<u64>().ok());
        let port = number(labels::PROBE_PORT).and_then(|p| u16::try_from(p).ok());
        let path = labels.get(labels::PROBE_PATH).cloned().unwrap_or_else(|| "/".into());
        let kind = match labels.get(labels::PROBE)?.as_str() {
            "docker" => Kind::Docker,
            "http" => {
                let (min, max) = labels
                    .get(labels::PROBE_STATUS)
                    .and_then(|s| s.split_once('-'))
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                    .unwrap_or((200, 399));
                Kind::Http { port: port?, path, min, max }
            }
            "mcp" => Kind::Mcp { port: port?, path },
            _ => return None,
        };
        Some(Self {
            kind,
            interval: Duration::from_millis(number(labels::PROBE_INTERVAL_MS).unwrap_or(10_000)),
            timeout: Duration::from_millis(number(labels::PROBE_TIMEOUT_MS).unwrap_or(5_000)),
            threshold: number(labels::PROBE_THRESHOLD).and_then(|t| u32::try_from(t).ok()).unwrap_or(3).max(1),
            start_period: Duration::from_millis(number(labels::PROBE_START_PERIOD_MS).unwrap_or(0)),
            max_restarts,
        })
    }
}

/// What one probe found.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub detail: String,
    pub latency: Duration,
    pub server: Option<McpServer>,
}

/// The probes speak plain HTTP, but when this crate is built beside others that give
/// reqwest rustls without choosing a crypto provider (Cargo unifies features across a
/// workspace), building any client needs a process-wide provider. Ours is ring, as for
/// the session's own TLS; one already installed is kept.
fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Speaks MCP to `url`: `initialize`, then `tools/list`. Healthy only if both answer.
pub async fn probe_mcp(url: &str, timeout: Duration) -> Result<McpServer, String> {
    ensure_crypto_provider();
    let work = async {
        let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
        let client = ClientInfo::default().serve(transport).await.map_err(|e| format!("initialize failed: {e}"))?;
        let (name, version) = client
            .peer_info()
            .map(|info| (info.server_info.name.clone(), info.server_info.version.clone()))
            .unwrap_or_default();
        let tools = client.list_all_tools().await.map_err(|e| format!("tools/list failed: {e}"));
        let _ = client.cancel().await;
        let tools = tools?
            .into_iter()
            .map(|tool| McpTool {
                name: tool.name.to_string(),
                description: tool.description.map(|d| d.to_string()).unwrap_or_default(),
                input_schema_json: serde_json::to_string(tool.input_schema.as_ref()).unwrap_or_default(),
            })
            .collect();
        Ok(McpServer { name, version, tools })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn probe_http(url: &str, min: u16, max: u16, timeout: Duration) -> Result<String, String> {
    ensure_crypto_provider();
    let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| e.to_string())?;
    let response = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    if (min..=max).contains(&status) {
        Ok(format!("GET {url} answered {status}"))
    } else {
        Err(format!("GET {url} answered {status}, expected {min}-{max}"))
    }
}

/// Probes `target` once, the way its health check says.
#[tracing::instrument(skip_all, fields(deployment_id = %target.status.deployment_id, container = %target.container_id))]
pub async fn probe(target: &Target) -> Outcome {
    let (spec, address, docker_health) = (&target.probe, target.address.as_deref(), target.docker_health);
    let started = Instant::now();
    let result: Result<(String, Option<McpServer>), String> = match (&spec.kind, address) {
        (Kind::Docker, _) => match docker_health {
            Some(Health::Healthy) => Ok(("the image's HEALTHCHECK passes".into(), None)),
            Some(Health::Starting) => Err("the image's HEALTHCHECK is starting".into()),
            Some(_) => Err("the image's HEALTHCHECK fails".into()),
            None => Err("the image has no HEALTHCHECK".into()),
        },
        (_, None) => Err("the container has no address on the droplet network".into()),
        (Kind::Http { port, path, min, max }, Some(ip)) => {
            probe_http(&format!("http://{ip}:{port}{path}"), *min, *max, spec.timeout).await.map(|d| (d, None))
        }
        (Kind::Mcp { port, path }, Some(ip)) => {
            probe_mcp(&format!("http://{ip}:{port}{path}"), spec.timeout).await.map(|server| {
                let names: Vec<&str> = server.tools.iter().map(|t| t.name.as_str()).collect();
                (
                    format!(
                        "MCP server {} {} answered tools/list with {} tools: {}",
                        server.name,
                        server.version,
                        names.len(),
                        names.join(", ")
                    ),
                    Some(server),
                )
            })
        }
    };
    let latency = started.elapsed();
    match result {
        Ok((detail, server)) => Outcome { ok: true, detail, latency, server },
        Err(detail) => Outcome { ok: false, detail, latency, server: None },
    }
}

/// A running container to probe.
pub struct Target {
    pub container_id: String,
    pub probe: ProbeSpec,
    pub address: Option<String>,
    pub docker_health: Option<Health>,
    pub status: ContainerStatus,
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla::proto;

    #[test]
    fn probe_settings_survive_the_trip_through_container_labels() -> Result<(), flotilla::spec::SpecError> {
        let spec = DeploymentSpec::try_from(proto::DeploymentSpec {
            image: "x".into(),
            mcp: Some(proto::McpEndpoint { port: 9000, path: "/rpc".into() }),
            restart_policy: Some(proto::RestartPolicy {
                mode: proto::restart_policy::Mode::OnFailure as i32,
                max_retries: 7,
            }),
            health_check: Some(proto::HealthCheck {
                probe: Some(proto::health_check::Probe::Mcp(Default::default())),
                failure_threshold: 4,
                ..Default::default()
            }),
            ..Default::default()
        })?;
        let labels: HashMap<String, String> = ProbeSpec::labels(&spec).into_iter().collect();
        let probe = ProbeSpec::from_labels(&labels).expect("a probe");
        assert_eq!(probe.kind, Kind::Mcp { port: 9000, path: "/rpc".into() });
        assert_eq!((probe.threshold, probe.max_restarts), (4, 7));
        assert_eq!(probe.interval, Duration::from_secs(10));
        assert!(ProbeSpec::from_labels(&HashMap::new()).is_none(), "no labels, no probe");
        Ok(())
    }
}
