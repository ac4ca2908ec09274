//! A deployment's spec as a validated domain type.
//!
//! The protobuf `DeploymentSpec` stops at the edge: `DeploymentSpec::try_from(proto)` checks
//! every field and names each one that is wrong (`ports[1].host_port: ...`). The control
//! plane runs it before a command is stored and the agent again before Docker is touched.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    time::Duration,
};

use crate::proto;

/// Labels under this prefix belong to Flotilla; a spec cannot set them.
pub const RESERVED_LABEL_PREFIX: &str = "dev.flotilla.";
/// Memory limits below this cannot run a process; above this they are a typo.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;
pub const MAX_MEMORY: u64 = 1 << 40;
/// 256 cores.
pub const MAX_CPU_MILLIS: u32 = 256_000;
pub const MAX_RESTARTS: u32 = 100;

/// One wrong field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path in the spec, e.g. `env[2].name`.
    pub field: String,
    pub description: String,
}

/// Every wrong field of a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub violations: Vec<FieldViolation>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect();
        write!(f, "invalid deployment spec: {}", parts.join("; "))
    }
}

/// An image reference: `[registry/]repository[:tag][@sha256:<digest>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.len() > 512 {
            return Err("is longer than 512 characters".into());
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest.strip_prefix("sha256:").ok_or("digest must be sha256:<64 hex digits>")?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err("digest must be sha256:<64 lowercase hex digits>".into());
                }
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(format!("tag {tag:?} is not a valid tag"));
            }
        }
        let mut components: Vec<&str> = name.split('/').collect();
        let registry = match components.first() {
            Some(first)
                if components.len() > 1 && (first.contains('.') || first.contains(':') || *first == "localhost") =>
            {
                let host = components.remove(0);
                if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
                    return Err(format!("registry {host:?} is not a host[:port]"));
                }
                Some(host.to_owned())
            }
            _ => None,
        };
        for component in &components {
            let valid = !component.is_empty()
                && component.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && component.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && component.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
            if !valid {
                return Err(format!(
                    "repository component {component:?} must be lowercase letters, digits and . _ - between them"
                ));
            }
        }
        Ok(Self { registry, repository: components.join("/"), tag: tag.map(String::from), digest })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::IfNotPresent => "if-not-present",
            Self::Never => "never",
        }
    }
}

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: Secret,
    pub server: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: Secret,
    pub secret: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub container_port: u16,
    /// `None`: the engine chooses.
    pub host_port: Option<u16>,
    pub protocol: Protocol,
    pub bind_address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub container_path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    No,
    OnFailure { max_retries: u32 },
    Always,
    UnlessStopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Docker,
    Http { port: u16, path: String, status_min: u16, status_max: u16 },
    Mcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub start_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpEndpoint {
    pub port: u16,
    pub path: String,
}

/// A validated deployment spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSpec {
    pub image: ImageRef,
    pub registry_auth: Option<RegistryAuth>,
    pub pull_policy: PullPolicy,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub ports: Vec<Port>,
    pub labels: BTreeMap<String, String>,
    pub volumes: Vec<Volume>,
    pub restart: RestartMode,
    pub resources: Resources,
    pub health: Option<HealthCheck>,
    pub mcp: Option<McpEndpoint>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
}

#[derive(Default)]
struct Check {
    violations: Vec<FieldViolation>,
}

impl Check {
    fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation { field: field.into(), description: description.into() });
    }

    fn port(&mut self, field: &str, value: u32) -> u16 {
        match u16::try_from(value) {
            Ok(port) if port >= 1 => port,
            _ => {
                self.fail(field, format!("{value} is not a port (1-65535)"));
                0
            }
        }
    }

    fn duration(
        &mut self,
        field: &str,
        value: Option<prost_types::Duration>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match Duration::try_from(value) {
            Ok(d) if d >= min && d <= max => d,
            _ => {
                self.fail(field, format!("must be between {min:?} and {max:?}"));
                default
            }
        }
    }
}

fn no_nul(check: &mut Check, field: &str, value: &str) {
    if value.contains('\0') {
        check.fail(field, "contains a NUL byte");
    }
}

impl TryFrom<proto::DeploymentSpec> for DeploymentSpec {
    type Error = SpecError;

    fn try_from(spec: proto::DeploymentSpec) -> Result<Self, SpecError> {
        let mut check = Check::default();
        let image = ImageRef::parse(&spec.image).unwrap_or_else(|e| {
            check.fail("image", e);
            ImageRef { registry: None, repository: String::new(), tag: None, digest: None }
        });
        let registry_auth = spec.registry_auth.filter(|a| !a.username.is_empty() || !a.password.is_empty()).map(|a| {
            if a.username.is_empty() {
                check.fail("registry_auth.username", "is required with a password");
            }
            RegistryAuth { username: a.username, password: Secret(a.password), server: a.server }
        });
        use proto::deployment_spec::PullPolicy as P;
        let pull_policy = match P::try_from(spec.pull_policy) {
            Ok(P::Always) => PullPolicy::Always,
            Ok(P::Never) => PullPolicy::Never,
            Ok(P::IfNotPresent | P::Unspecified) => PullPolicy::IfNotPresent,
            Err(_) => {
                check.fail("pull_policy", format!("{} is not a pull policy", spec.pull_policy));
                PullPolicy::IfNotPresent
            }
        };
        for (i, arg) in spec.command.iter().enumerate() {
            no_nul(&mut check, &format!("command[{i}]"), arg);
        }
        for (i, arg) in spec.args.iter().enumerate() {
            no_nul(&mut check, &format!("args[{i}]"), arg);
        }

        let mut names = HashSet::new();
        let env = spec
            .env
            .into_iter()
            .enumerate()
            .map(|(i, var)| {
                let field = format!("env[{i}].name");
                if var.name.is_empty() {
                    check.fail(&field, "is empty");
                } else if var.name.contains('=') {
                    check.fail(&field, format!("{:?} contains '='", var.name));
                } else if var.name.contains('\0') {
                    check.fail(&field, "contains a NUL byte");
                } else if !names.insert(var.name.clone()) {
                    check.fail(&field, format!("{:?} is set twice", var.name));
                }
                no_nul(&mut check, &format!("env[{i}].value"), &var.value);
                EnvVar { name: var.name, value: Secret(var.value), secret: var.secret }
            })
            .collect();

        let mut host_ports = HashSet::new();
        let ports = spec
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let container_port = check.port(&format!("ports[{i}].container_port"), p.container_port);
                let host_port = match p.host_port {
                    0 => None,
                    n => Some(check.port(&format!("ports[{i}].host_port"), n)),
                };
                use proto::port_publication::Protocol as Pr;
                let protocol = match Pr::try_from(p.protocol) {
                    Ok(Pr::Udp) => Protocol::Udp,
                    Ok(Pr::Tcp | Pr::Unspecified) => Protocol::Tcp,
                    Err(_) => {
                        check.fail(format!("ports[{i}].protocol"), "must be tcp or udp");
                        Protocol::Tcp
                    }
                };
                if let Some(port) = host_port.filter(|p| *p != 0)
                    && !host_ports.insert((port, protocol))
                {
                    check.fail(
                        format!("ports[{i}].host_port"),
                        format!("{port}/{} is published twice", protocol.as_str()),
                    );
                }
                let bind_address = match p.bind_address.as_str() {
                    "" => None,
                    addr => match addr.parse::<IpAddr>() {
                        Ok(ip) => Some(ip),
                        Err(_) => {
                            check.fail(format!("ports[{i}].bind_address"), format!("{addr:?} is not an IP address"));
                            None
                        }
                    },
                };
                Port { container_port, host_port, protocol, bind_address }
            })
            .collect();

        for (key, value) in &spec.labels {
            if key.starts_with(RESERVED_LABEL_PREFIX) {
                check.fail(format!("labels[{key}]"), format!("the {RESERVED_LABEL_PREFIX} prefix is reserved"));
            }
            if key.is_empty() {
                check.fail("labels", "a label has an empty key");
            }
            no_nul(&mut check, &format!("labels[{key}]"), value);
        }

        let volumes = spec
            .volumes
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let name_ok = !v.name.is_empty()
                    && v.name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                    && v.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                if v.name.contains('/') {
                    check.fail(format!("volumes[{i}].name"), "host paths cannot be mounted; name a volume instead");
                } else if !name_ok {
                    check.fail(format!("volumes[{i}].name"), format!("{:?} is not a volume name", v.name));
                }
                if !v.container_path.starts_with('/') {
                    check.fail(format!("volumes[{i}].container_path"), "must be an absolute path");
                }
                if v.container_path.contains("docker.sock") {
                    check.fail(format!("volumes[{i}].container_path"), "the Docker socket cannot be mounted");
                }
                Volume { name: v.name, container_path: v.container_path, read_only: v.read_only }
            })
            .collect();

        use proto::restart_policy::Mode as M;
        let restart_policy = spec.restart_policy.unwrap_or_default();
        if restart_policy.max_retries > MAX_RESTARTS {
            check.fail("restart_policy.max_retries", format!("at most {MAX_RESTARTS}"));
        }
        let restart = match M::try_from(restart_policy.mode) {
            Ok(M::No) => RestartMode::No,
            Ok(M::Always) => RestartMode::Always,
            Ok(M::UnlessStopped) => RestartMode::UnlessStopped,
            Ok(M::OnFailure | M::Unspecified) => RestartMode::OnFailure {
                max_retries: if restart_policy.max_retries == 0 {
                    5
                } else {
                    restart_policy.max_retries.min(MAX_RESTARTS)
                },
            },
            Err(_) => {
                check.fail("restart_policy.mode", "is not a restart mode");
                RestartMode::No
            }
        };

        let r = spec.resources.unwrap_or_default();
        let memory_bytes = match r.memory_bytes {
            0 => None,
            m if (MIN_MEMORY..=MAX_MEMORY).contains(&m) => Some(m),
            m => {
                check.fail("resources.memory_bytes", format!("{m} is outside {MIN_MEMORY}..={MAX_MEMORY}"));
                None
            }
        };
        let cpu_millis = match r.cpu_millis {
            0 => None,
            c if c <= MAX_CPU_MILLIS => Some(c),
            c => {
                check.fail("resources.cpu_millis", format!("{c} is more than {MAX_CPU_MILLIS}"));
                None
            }
        };

        let health = spec.health_check.map(|h| {
            use proto::health_check::Probe as Pb;
            let probe = match h.probe {
                Some(Pb::Docker(_)) => Probe::Docker,
                Some(Pb::Mcp(_)) | None => Probe::Mcp,
                Some(Pb::Http(http)) => {
                    let port = check.port("health_check.http.port", http.port);
                    if !http.path.starts_with('/') {
                        check.fail("health_check.http.path", "must start with '/'");
                    }
                    let (min, max) = match (http.expected_status_min, http.expected_status_max) {
                        (0, 0) => (200, 399),
                        (min, max) if (100..=599).contains(&min) && (min..=599).contains(&max) => (min, max),
                        _ => {
                            check.fail("health_check.http.expected_status_min", "must be 100-599 and at most the max");
                            (200, 399)
                        }
                    };
                    Probe::Http { port, path: http.path, status_min: min as u16, status_max: max as u16 }
                }
            };
            let second = Duration::from_secs(1);
            let interval = check.duration(
                "health_check.interval",
                h.interval,
                Duration::from_secs(10),
                second,
                Duration::from_secs(3600),
            );
            // Unset, the timeout is 5 s or the interval, whichever is shorter.
            let timeout = check.duration(
                "health_check.timeout",
                h.timeout,
                Duration::from_secs(5).min(interval),
                Duration::from_millis(100),
                Duration::from_secs(300),
            );
            if timeout > interval {
                check.fail("health_check.timeout", "must not be longer than the interval");
            }
            let start_period = check.duration(
                "health_check.start_period",
                h.start_period,
                Duration::ZERO,
                Duration::ZERO,
                Duration::from_secs(3600),
            );
            let failure_threshold = match h.failure_threshold {
                0 => 3,
                n if n <= 100 => n,
                n => {
                    check.fail("health_check.failure_threshold", format!("{n} is more than 100"));
                    3
                }
            };
            HealthCheck { probe, interval, timeout, failure_threshold, start_period }
        });

        let mcp = spec.mcp.map(|m| {
            let port = check.port("mcp.port", m.port);
            let path = if m.path.is_empty() { "/mcp".to_owned() } else { m.path };
            if !path.starts_with('/') {
                check.fail("mcp.path", "must start with '/'");
            }
            McpEndpoint { port, path }
        });
        if matches!(health.as_ref().map(|h| &h.probe), Some(Probe::Mcp)) && mcp.is_none() {
            check.fail("health_check.mcp", "an MCP probe needs the mcp section (port and path)");
        }

        if spec.privileged {
            check.fail("privileged", "privileged containers are not allowed");
        }
        for (field, mode) in
            [("network_mode", &spec.network_mode), ("pid_mode", &spec.pid_mode), ("ipc_mode", &spec.ipc_mode)]
        {
            if !mode.is_empty() {
                check.fail(
                    field,
                    format!("{mode:?} is not allowed: containers use the droplet's own network and namespaces"),
                );
            }
        }
        if !spec.cap_add.is_empty() {
            check.fail("cap_add", "added capabilities are not allowed");
        }
        let working_dir = Some(spec.working_dir).filter(|w| !w.is_empty());
        if working_dir.as_ref().is_some_and(|w| !w.starts_with('/')) {
            check.fail("working_dir", "must be an absolute path");
        }
        let user = Some(spec.user).filter(|u| !u.is_empty());

        if !check.violations.is_empty() {
            return Err(SpecError { violations: check.violations });
        }
        Ok(Self {
            image,
            registry_auth,
            pull_policy,
            command: spec.command,
            args: spec.args,
            env,
            ports,
            labels: spec.labels.into_iter().collect(),
            volumes,
            restart,
            resources: Resources { memory_bytes, cpu_millis },
            health,
            mcp,
            user,
            working_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        DeploymentSpec as P, EnvVar as PEnv, HealthCheck as PHealth, HttpProbe, McpEndpoint as PMcp, PortPublication,
        Resources as PRes, VolumeMount, health_check,
    };

    fn base() -> P {
        P { image: "registry.example.com:5000/team/server:1.2".into(), ..Default::default() }
    }

    fn fields(spec: P) -> Vec<String> {
        match DeploymentSpec::try_from(spec) {
            Ok(_) => vec![],
            Err(e) => e.violations.into_iter().map(|v| v.field).collect(),
        }
    }

    #[test]
    fn image_references_parse_like_docker_reads_them() {
        assert!(ImageRef::parse("localhost:5000/flotilla/mcp:1.0@sha256:").is_err());
        let r = ImageRef::parse("127.0.0.1:5000/flotilla/test-mcp:latest").expect("valid");
        assert_eq!(r.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repository, "flotilla/test-mcp");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = ImageRef::parse("debian").expect("valid");
        assert_eq!((r.registry, r.repository.as_str(), r.tag), (None, "debian", None));
        let digest = format!("alpine@sha256:{}", "a".repeat(64));
        assert_eq!(ImageRef::parse(&digest).expect("valid").to_string(), digest);
        for bad in ["", "UPPER/case", "a//b", "name:", "name:-tag", "-lead", "x@sha256:short", "trail-"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_good_spec_passes_with_defaults_filled_in() -> Result<(), SpecError> {
        let spec = DeploymentSpec::try_from(P {
            mcp: Some(PMcp { port: 8080, path: String::new() }),
            health_check: Some(PHealth {
                probe: Some(health_check::Probe::Mcp(Default::default())),
                ..Default::default()
            }),
            ..base()
        })?;
        assert_eq!(spec.mcp, Some(McpEndpoint { port: 8080, path: "/mcp".into() }));
        assert_eq!(spec.restart, RestartMode::OnFailure { max_retries: 5 });
        assert_eq!(spec.pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(spec.health.map(|h| (h.interval, h.failure_threshold)), Some((Duration::from_secs(10), 3)));
        let short = DeploymentSpec::try_from(P {
            mcp: Some(PMcp { port: 8080, path: String::new() }),
            health_check: Some(PHealth {
                probe: Some(health_check::Probe::Mcp(Default::default())),
                interval: prost_types::Duration::try_from(Duration::from_secs(2)).ok(),
                ..Default::default()
            }),
            ..base()
        })?;
        assert_eq!(
            short.health.map(|h| h.timeout),
            Some(Duration::from_secs(2)),
            "the default timeout fits the interval"
        );
        Ok(())
    }

    #[test]
    fn each_forbidden_or_malformed_field_is_named() {
        let env = |name: &str| PEnv { name: name.into(), value: "v".into(), secret: false };
        let cases: Vec<(P, &str)> = vec![
            (P { image: "Bad Image".into(), ..base() }, "image"),
            (P { env: vec![env("A=B")], ..base() }, "env[0].name"),
            (P { env: vec![env("A\0")], ..base() }, "env[0].name"),
            (P { env: vec![env("A"), env("A")], ..base() }, "env[1].name"),
            (
                P { ports: vec![PortPublication { container_port: 0, ..Default::default() }], ..base() },
                "ports[0].container_port",
            ),
            (
                P {
                    ports: vec![PortPublication { container_port: 80, host_port: 70000, ..Default::default() }],
                    ..base()
                },
                "ports[0].host_port",
            ),
            (
                P {
                    ports: vec![
                        PortPublication { container_port: 80, host_port: 8080, ..Default::default() },
                        PortPublication { container_port: 81, host_port: 8080, ..Default::default() },
                    ],
                    ..base()
                },
                "ports[1].host_port",
            ),
            (P { privileged: true, ..base() }, "privileged"),
            (P { network_mode: "host".into(), ..base() }, "network_mode"),
            (P { pid_mode: "host".into(), ..base() }, "pid_mode"),
            (P { ipc_mode: "host".into(), ..base() }, "ipc_mode"),
            (P { cap_add: vec!["SYS_ADMIN".into()], ..base() }, "cap_add"),
            (
                P {
                    volumes: vec![VolumeMount { name: "/etc".into(), container_path: "/x".into(), read_only: false }],
                    ..base()
                },
                "volumes[0].name",
            ),
            (
                P {
                    volumes: vec![VolumeMount {
                        name: "data".into(),
                        container_path: "/var/run/docker.sock".into(),
                        read_only: false,
                    }],
                    ..base()
                },
                "volumes[0].container_path",
            ),
            (
                P { labels: [("dev.flotilla.managed".to_owned(), "true".to_owned())].into(), ..base() },
                "labels[dev.flotilla.managed]",
            ),
            (P { resources: Some(PRes { memory_bytes: 1024, cpu_millis: 0 }), ..base() }, "resources.memory_bytes"),
            (P { resources: Some(PRes { memory_bytes: 0, cpu_millis: 10_000_000 }), ..base() }, "resources.cpu_millis"),
            (
                P {
                    health_check: Some(PHealth {
                        probe: Some(health_check::Probe::Http(HttpProbe {
                            port: 8080,
                            path: "health".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }),
                    ..base()
                },
                "health_check.http.path",
            ),
            (P { health_check: Some(PHealth::default()), ..base() }, "health_check.mcp"),
            (P { working_dir: "relative".into(), ..base() }, "working_dir"),
        ];
        for (spec, field) in cases {
            assert_eq!(fields(spec), vec![field.to_owned()], "{field}");
        }
    }

    #[test]
    fn all_violations_are_reported_at_once_and_secrets_do_not_print() {
        let err =
            DeploymentSpec::try_from(P { image: String::new(), privileged: true, ..base() }).expect_err("two faults");
        assert_eq!(err.violations.len(), 2);
        assert!(err.to_string().contains("image: is empty") && err.to_string().contains("privileged"));
        let var = EnvVar { name: "TOKEN".into(), value: Secret("hunter2".into()), secret: true };
        assert!(!format!("{var:?}").contains("hunter2"));
    }
}
