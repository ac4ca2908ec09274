//! The `#cloud-config` user data a new droplet boots with: install Docker when missing,
//! write the agent's bootstrap settings to a root-only file, and start the agent container.
//!
//! The only credential it carries is the droplet's own one-time enrollment token (which
//! already holds the CA pin): never a cloud token, a database credential or a shared secret.
//! Every value is validated before it is written, and single-quoted where it meets a shell.
//!
//! It creates no users: `users: []` stops cloud-init from adding the image's default user
//! (leaving `users` out would merge in the image's `users: [default]`). SSH keys given to the
//! cloud then land on root, where the image's `disable_root` decides whether they log in
//! (DigitalOcean's images log in as root). Debian bookworm's cloud-init 22.4 schema wrongly
//! calls `users: []` too short (LP #1999476, fixed in cloud-init 23.2); the runtime has always
//! honoured it, and the deprecated `{}` and `""` forms would mark every boot as degraded.

use std::{fmt, net::Ipv4Addr, net::Ipv6Addr, str::FromStr as _};

use flotilla::spec::ImageRef;

use crate::identity::enrollment::Token;

/// Where the agent keeps its bootstrap settings on the droplet (root only, mode 0600).
pub const AGENT_ENV_PATH: &str = "/etc/flotilla/agent.env";
/// The script cloud-init runs once to start the agent.
pub const BOOTSTRAP_PATH: &str = "/usr/local/sbin/flotilla-agent-bootstrap";
/// The agent container's name on the droplet.
pub const AGENT_CONTAINER: &str = "flotilla-agent";
/// The named volume that keeps the agent's identity and ledger across container restarts.
pub const STATE_VOLUME: &str = "flotilla-agent-state";
/// The agent's state dir inside its container (its `--state-dir` default).
pub const STATE_DIR: &str = "/var/lib/flotilla-agent";
/// Cloud-init's own limit on DigitalOcean is 64 KiB; ours stays far below it.
pub const MAX_USER_DATA: usize = 64 * 1024;

/// Whether the droplet's image needs Docker installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DockerInstall {
    /// Install Debian's/Ubuntu's `docker.io` when no `docker` command is found.
    #[default]
    IfMissing,
    /// The image ships Docker; fail loudly if it does not.
    Skip,
}

/// What a droplet's user data is made from. Addresses are `host:port` (an IPv6 host in
/// brackets); `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct UserDataOptions {
    /// The control plane's agent port, e.g. `cp.example.com:7443`.
    pub control_plane: String,
    /// The enrollment port, e.g. `cp.example.com:7444`.
    pub enrollment: String,
    /// The droplet's one-time enrollment token, `FLT1-...`.
    pub token: String,
    /// SHA-256 of the fleet CA (64 hex digits); must match the pin inside the token.
    pub ca_sha256: String,
    /// The agent image, `[registry/]name[:tag][@sha256:...]`.
    pub image: String,
    pub docker: DockerInstall,
    /// json-file log rotation for the agent container: size of one file in MiB, and files kept.
    pub log_max_size_mib: u32,
    pub log_max_files: u32,
}

impl UserDataOptions {
    /// Options with the defaults for Docker and log rotation (10 MiB × 3 files).
    pub fn new(
        control_plane: impl Into<String>,
        enrollment: impl Into<String>,
        token: impl Into<String>,
        ca_sha256: impl Into<String>,
        image: impl Into<String>,
    ) -> Self {
        Self {
            control_plane: control_plane.into(),
            enrollment: enrollment.into(),
            token: token.into(),
            ca_sha256: ca_sha256.into(),
            image: image.into(),
            docker: DockerInstall::IfMissing,
            log_max_size_mib: 10,
            log_max_files: 3,
        }
    }
}

impl fmt::Debug for UserDataOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserDataOptions")
            .field("control_plane", &self.control_plane)
            .field("enrollment", &self.enrollment)
            .field("token", &"<redacted>")
            .field("ca_sha256", &self.ca_sha256)
            .field("image", &self.image)
            .field("docker", &self.docker)
            .field("log_max_size_mib", &self.log_max_size_mib)
            .field("log_max_files", &self.log_max_files)
            .finish()
    }
}

/// Why user data could not be made; each names the option that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("{field}: {value:?} is not host:port ({reason})")]
    Address { field: &'static str, value: String, reason: &'static str },
    #[error("token: not a Flotilla enrollment token (expected FLT1-<ca sha256>-<id>-<secret>)")]
    Token,
    #[error("ca_sha256: expected 64 lowercase hex digits")]
    CaPin,
    #[error("ca_sha256: does not match the pin inside the token")]
    CaPinMismatch,
    #[error("image: {0}")]
    Image(String),
    #[error("{field}: must be between 1 and {max}, got {got}")]
    LogRotation { field: &'static str, got: u32, max: u32 },
}

/// A validated `host:port`, written back as `host:port` (IPv6 in brackets).
struct HostPort(String);

impl HostPort {
    fn parse(field: &'static str, value: &str) -> Result<Self, UserDataError> {
        let bad = |reason| UserDataError::Address { field, value: value.to_owned(), reason };
        let (host, port) = value.rsplit_once(':').ok_or(bad("no :port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("the port is not a number from 1 to 65535"));
        }
        if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Ipv6Addr::from_str(v6).map_err(|_| bad("the bracketed host is not an IPv6 address"))?;
        } else if Ipv4Addr::from_str(host).is_err() && !valid_dns_name(host) {
            return Err(bad("the host is not a DNS name, an IPv4 address or a bracketed IPv6 address"));
        }
        Ok(Self(format!("{host}:{port}")))
    }
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63 characters, no hyphen at
/// either end of a label; 253 characters at most.
fn valid_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `value` as one shell word: single-quoted, with any `'` closed, escaped and reopened.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The agent's settings as environment variables (name, value).
pub type AgentEnv = Vec<(&'static str, String)>;

/// The agent's image and settings, validated.
pub fn agent_settings(options: &UserDataOptions) -> Result<(String, AgentEnv), UserDataError> {
    let control_plane = HostPort::parse("control_plane", &options.control_plane)?;
    let enrollment = HostPort::parse("enrollment", &options.enrollment)?;
    let token: Token = options.token.parse().map_err(|_| UserDataError::Token)?;
    let pin = &options.ca_sha256;
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(UserDataError::CaPin);
    }
    if *pin != token.ca_sha256 {
        return Err(UserDataError::CaPinMismatch);
    }
    let image = ImageRef::parse(&options.image).map_err(UserDataError::Image)?.to_string();
    for (field, got, max) in
        [("log_max_size_mib", options.log_max_size_mib, 1024), ("log_max_files", options.log_max_files, 100)]
    {
        if got == 0 || got > max {
            return Err(UserDataError::LogRotation { field, got, max });
        }
    }

    // Every value below is from a validated alphabet (no quotes, spaces or newlines), so it
    // is safe in the YAML block scalars and in an env file that Docker reads literally.
    let env = [
        ("FLOTILLA_CONTROL_PLANE", format!("https://{}", control_plane.0)),
        ("FLOTILLA_ENROLL_URL", format!("https://{}", enrollment.0)),
        ("FLOTILLA_TOKEN", token.reveal()),
        ("FLOTILLA_CA_SHA256", pin.clone()),
        ("FLOTILLA_STATE_DIR", STATE_DIR.to_owned()),
    ];
    Ok((image, env.into()))
}

/// The one line to run on an existing host (`byo`) to start its agent: the same container
/// the user data starts. The token is on the command line here, so the line is shown to
/// whoever created the droplet and nowhere else; it is single-use and expires.
pub fn install_command(options: &UserDataOptions) -> Result<String, UserDataError> {
    let (image, env) = agent_settings(options)?;
    let (size, files) = (options.log_max_size_mib, options.log_max_files);
    let env: String = env.iter().map(|(name, value)| format!(" --env {name}={}", shell_quote(value))).collect();
    let health = shell_quote(&format!("test -s {STATE_DIR}/identity.pem"));
    Ok(format!(
        "docker run --detach --name {AGENT_CONTAINER} --restart unless-stopped --network host \
         --volume /var/run/docker.sock:/var/run/docker.sock --volume {STATE_VOLUME}:{STATE_DIR} \
         --log-driver json-file --log-opt max-size={size}m --log-opt max-file={files} \
         --health-cmd {health} --health-interval 30s{env} {}",
        shell_quote(&image)
    ))
}

/// Renders the `#cloud-config` user data, or says which option is wrong.
pub fn render(options: &UserDataOptions) -> Result<String, UserDataError> {
    let (image, env) = agent_settings(options)?;
    let env_file: String = env.iter().map(|(name, value)| format!("      {name}={value}\n")).collect();
    let script = indent(&bootstrap_script(&image, options), "      ");

    Ok(format!(
        "#cloud-config
# Flotilla agent bootstrap, made by the control plane for one droplet.
# No users: the agent needs none, and SSH keys given to the cloud stay on root.
users: []
ssh_pwauth: false
write_files:
  - path: {AGENT_ENV_PATH}
    owner: root:root
    permissions: '0600'
    content: |
{env_file}  - path: {BOOTSTRAP_PATH}
    owner: root:root
    permissions: '0700'
    content: |
{script}runcmd:
  - [{BOOTSTRAP_PATH}]
"
    ))
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|line| if line.is_empty() { "\n".to_owned() } else { format!("{by}{line}\n") }).collect()
}

/// The once-only script that installs Docker when asked and starts the agent container.
fn bootstrap_script(image: &str, options: &UserDataOptions) -> String {
    let image = shell_quote(image);
    let docker = match options.docker {
        DockerInstall::IfMissing => {
            "if ! command -v docker >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || fail \"Docker is missing and this image has no apt-get\"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q docker.io
fi"
        }
        DockerInstall::Skip => {
            "command -v docker >/dev/null 2>&1 || fail \"Docker is missing and this droplet's options skip installing it\""
        }
    };
    let (size, files) = (options.log_max_size_mib, options.log_max_files);
    let health = shell_quote(&format!("test -s {STATE_DIR}/identity.pem"));
    format!(
        "#!/bin/sh
# Starts the Flotilla agent; cloud-init runs this once. No shell tracing: the token is
# read by Docker from {AGENT_ENV_PATH} and never appears on a command line.
set -eu

image={image}

fail() {{
  echo \"flotilla-agent-bootstrap: $1\" >&2
  exit 1
}}

{docker}
if command -v systemctl >/dev/null 2>&1; then
  systemctl enable --now docker.service || true
fi

tries=0
until docker pull \"$image\"; do
  tries=$((tries + 1))
  [ \"$tries\" -lt 20 ] || fail \"cannot pull $image\"
  sleep 15
done

if docker container inspect {AGENT_CONTAINER} >/dev/null 2>&1; then
  echo \"flotilla-agent-bootstrap: the {AGENT_CONTAINER} container exists already\" >&2
  exit 0
fi

# No published ports: the agent only dials out. The host's network namespace lets it reach
# the containers it runs on the droplet's own network (Docker isolates bridge networks
# from each other). Health: the agent holds its own certificate.
docker run --detach --name {AGENT_CONTAINER} \\
  --restart unless-stopped --network host \\
  --env-file {AGENT_ENV_PATH} \\
  --volume /var/run/docker.sock:/var/run/docker.sock \\
  --volume {STATE_VOLUME}:{STATE_DIR} \\
  --log-driver json-file --log-opt max-size={size}m --log-opt max-file={files} \\
  --health-cmd {health} \\
  --health-interval 30s --health-timeout 5s --health-retries 3 --health-start-period 2m \\
  \"$image\"
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn token() -> String {
        format!("FLT1-{PIN}-{}-{}", "ab".repeat(16), "cd".repeat(32))
    }

    fn options() -> UserDataOptions {
        UserDataOptions::new("cp.example.com:7443", "cp.example.com:7444", token(), PIN, "ghcr.io/flotilla/agent:0.1.0")
    }

    #[test]
    fn renders_the_agent_bootstrap() -> Result<(), UserDataError> {
        let doc = render(&options())?;
        assert!(doc.starts_with("#cloud-config\n"), "{doc}");
        assert!(doc.contains("\nusers: []\n"), "{doc}");
        assert!(doc.contains("permissions: '0600'"), "{doc}");
        for line in [
            "FLOTILLA_CONTROL_PLANE=https://cp.example.com:7443",
            "FLOTILLA_ENROLL_URL=https://cp.example.com:7444",
            &format!("FLOTILLA_TOKEN={}", token()),
            &format!("FLOTILLA_CA_SHA256={PIN}"),
            "image='ghcr.io/flotilla/agent:0.1.0'",
            "--restart unless-stopped",
            "--volume /var/run/docker.sock:/var/run/docker.sock",
            "--volume flotilla-agent-state:/var/lib/flotilla-agent",
            "--log-driver json-file --log-opt max-size=10m --log-opt max-file=3",
            "--health-cmd 'test -s /var/lib/flotilla-agent/identity.pem'",
            "apt-get install -y -q docker.io",
        ] {
            assert!(doc.contains(line), "missing {line:?} in\n{doc}");
        }
        // The token is only in the root-only file, never on a command line.
        assert_eq!(doc.matches(&token()).count(), 1, "{doc}");
        assert!(!doc.contains("set -x") && !doc.contains("--publish") && !doc.contains(" -p "), "{doc}");
        assert!(doc.len() < MAX_USER_DATA);
        Ok(())
    }

    #[test]
    fn skipping_docker_fails_loudly_instead_of_installing() -> Result<(), UserDataError> {
        let doc = render(&UserDataOptions { docker: DockerInstall::Skip, ..options() })?;
        assert!(!doc.contains("apt-get"), "{doc}");
        assert!(doc.contains("skip installing it"), "{doc}");
        Ok(())
    }

    #[test]
    fn ipv6_and_ipv4_hosts_are_accepted() -> Result<(), UserDataError> {
        let doc = render(&UserDataOptions { control_plane: "[2001:db8::1]:7443".into(), ..options() })?;
        assert!(doc.contains("FLOTILLA_CONTROL_PLANE=https://[2001:db8::1]:7443"), "{doc}");
        render(&UserDataOptions { enrollment: "10.0.0.1:7444".into(), ..options() })?;
        Ok(())
    }

    #[test]
    fn bad_addresses_are_refused_by_name() {
        for bad in [
            "cp.example.com",
            "cp.example.com:0",
            "cp.example.com:70000",
            "cp example.com:7443",
            "cp.example.com;reboot:7443",
            "$(reboot):7443",
            "'cp':7443",
            "-cp.example.com:7443",
            "[not-v6]:7443",
            ":7443",
            "cp.example.com:7443\nFLOTILLA_X=1",
        ] {
            let err = render(&UserDataOptions { control_plane: bad.into(), ..options() }).expect_err(bad);
            assert!(matches!(err, UserDataError::Address { field: "control_plane", .. }), "{bad}: {err}");
            let err = render(&UserDataOptions { enrollment: bad.into(), ..options() }).expect_err(bad);
            assert!(err.to_string().starts_with("enrollment: "), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_images_tokens_and_pins_are_refused() {
        for bad in ["", "Agent:1", "agent:1;reboot", "agent:$(reboot)", "agent:'x'", "agent:1 --privileged", "a\nb"] {
            let err = render(&UserDataOptions { image: bad.into(), ..options() }).expect_err(bad);
            assert!(matches!(err, UserDataError::Image(_)), "{bad:?}: {err}");
        }
        for bad in ["", "FLT1-x", &token().replace("FLT1", "FLT2"), &format!("{}\nx", token())] {
            let err = render(&UserDataOptions { token: bad.into(), ..options() }).expect_err(bad);
            assert_eq!(err, UserDataError::Token);
        }
        let err = render(&UserDataOptions { ca_sha256: PIN.to_uppercase(), ..options() }).expect_err("uppercase");
        assert_eq!(err, UserDataError::CaPin);
        let other = "f".repeat(64);
        let err = render(&UserDataOptions { ca_sha256: other, ..options() }).expect_err("mismatch");
        assert_eq!(err, UserDataError::CaPinMismatch);
        let err = render(&UserDataOptions { log_max_files: 0, ..options() }).expect_err("zero files");
        assert!(matches!(err, UserDataError::LogRotation { field: "log_max_files", .. }), "{err}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", options());
        assert!(!shown.contains(&"cd".repeat(32)), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn shell_quote_keeps_one_word() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
