//! Deployments: `deploy`, `ps`, `inspect`, `tools`, and the lifecycle verbs
//! `start`, `stop`, `restart`, `rm`.

use std::time::{Duration, Instant};

use flotilla::proto::{
    CommandOptions, CreateDeploymentRequest, Deployment, DeploymentSpec, DockerHealth, EnvVar, GetDeploymentRequest,
    HealthCheck, HttpProbe, ListDeploymentsRequest, ListDeploymentsResponse, ListToolsRequest, McpEndpoint, McpProbe,
    PortPublication, RemoveDeploymentRequest, RestartDeploymentRequest, StartDeploymentRequest, StopDeploymentRequest,
    VolumeMount, WatchEventsRequest, deployment_spec::PullPolicy, health_check::Probe, port_publication::Protocol,
};

use crate::{
    args::{ChangeArgs, DeployArgs, PsArgs, Pull, Target},
    connect::{self, Fleet},
    exit::Failure,
    output::{self, Output, Table},
    wait::{self, Progress},
};

pub async fn deploy(fleet: &mut Fleet, out: Output, args: DeployArgs) -> anyhow::Result<()> {
    let spec = spec(&args)?;
    let waiting = !args.wait.no_wait;
    // Subscribed before the deployment exists, so no pull event is missed. Progress is a
    // nicety: without the stream (an older control plane) the spinner still turns.
    let events = if waiting {
        let request = WatchEventsRequest {
            droplet_id: args.droplet.clone(),
            kinds: vec!["container.pull".into()],
            follow: true,
            ..Default::default()
        };
        fleet.watch_events(request).await.ok().map(tonic::Response::into_inner)
    } else {
        None
    };
    let request = CreateDeploymentRequest {
        droplet_id: args.droplet,
        name: args.name.unwrap_or_default(),
        spec: Some(spec),
        options: options(args.idempotency_key),
        validate_only: false,
    };
    let created = fleet.create_deployment(request).await?.into_inner();
    if !waiting {
        return show(out, &created);
    }
    eprintln!("deployment {} created; waiting for it to run", created.id);
    let deadline = Instant::now() + args.wait.timeout;
    let progress = Progress::new("deploy: sending to the droplet");
    let mut waiter = fleet.clone();
    let work = async {
        if !created.last_command_id.is_empty() {
            wait::command(&mut waiter, &created.last_command_id, deadline, &progress).await?;
        }
        wait::ready(&mut waiter, &created.id, deadline, &progress).await
    };
    let result = wait::with_pull_progress(work, events, &created.id, &progress).await;
    progress.finish();
    show(out, &result?)
}

pub async fn ps(fleet: &mut Fleet, out: Output, args: PsArgs) -> anyhow::Result<()> {
    let request = ListDeploymentsRequest {
        droplet_id: args.droplet.unwrap_or_default(),
        account: args.account.unwrap_or_default(),
        include_removed: args.all,
        page_size: args.page_size,
        page_token: String::new(),
    };
    let deployments = connect::every_page(|page_token| {
        let (mut fleet, request) = (fleet.clone(), ListDeploymentsRequest { page_token, ..request.clone() });
        async move {
            let page = fleet.list_deployments(request).await?.into_inner();
            Ok((page.deployments, page.next_page_token))
        }
    })
    .await?;
    if out.json {
        return output::json(&ListDeploymentsResponse { deployments, next_page_token: String::new() });
    }
    table(&deployments).print()
}

/// The deployment as stored, always as JSON (like `docker inspect`).
pub async fn inspect(fleet: &mut Fleet, target: Target) -> anyhow::Result<()> {
    let deployment = fleet.get_deployment(GetDeploymentRequest { id: target.deployment }).await?.into_inner();
    output::json(&deployment)
}

pub async fn tools(fleet: &mut Fleet, out: Output, target: Target) -> anyhow::Result<()> {
    let answer = fleet.list_tools(ListToolsRequest { deployment_id: target.deployment }).await?.into_inner();
    if out.json {
        return output::json(&answer);
    }
    output::line(format_args!(
        "server {} {} (tools listed {})",
        output::or_dash(&answer.server_name),
        answer.server_version,
        output::ago(answer.discovered_at.as_ref())
    ))?;
    let mut table = Table::new(&["TOOL", "DESCRIPTION"]);
    for tool in &answer.tools {
        table.row(vec![tool.name.clone(), output::or_dash(tool.description.lines().next().unwrap_or_default())]);
    }
    table.print()
}

/// A lifecycle verb and its own parameters.
pub enum Verb {
    Start,
    Stop(Option<Duration>),
    Restart(Option<Duration>),
    Remove { volumes: bool },
}

impl Verb {
    fn word(&self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Stop(_) => "stop",
            Verb::Restart(_) => "restart",
            Verb::Remove { .. } => "remove",
        }
    }
}

pub async fn change(fleet: &mut Fleet, out: Output, id: String, verb: Verb, change: ChangeArgs) -> anyhow::Result<()> {
    let options = options(change.idempotency_key);
    let grace = |g: Option<Duration>| g.and_then(output::duration);
    let changed = match verb {
        Verb::Start => fleet.start_deployment(StartDeploymentRequest { id: id.clone(), options }).await,
        Verb::Stop(g) => {
            fleet.stop_deployment(StopDeploymentRequest { id: id.clone(), grace: grace(g), options }).await
        }
        Verb::Restart(g) => {
            fleet.restart_deployment(RestartDeploymentRequest { id: id.clone(), grace: grace(g), options }).await
        }
        Verb::Remove { volumes } => {
            fleet.remove_deployment(RemoveDeploymentRequest { id: id.clone(), remove_volumes: volumes, options }).await
        }
    }?
    .into_inner();
    let command = changed.last_command_id.clone();
    if !change.wait.wait || command.is_empty() {
        if !out.json {
            return output::line(format_args!(
                "{}: deployment {id}, command {}",
                verb.word(),
                output::or_dash(&command)
            ));
        }
        return output::json(&changed);
    }
    let progress = Progress::new(&format!("{}: sending to the droplet", verb.word()));
    let done = wait::command(fleet, &command, Instant::now() + change.wait.timeout, &progress).await;
    progress.finish();
    done?;
    if !out.json {
        return output::line(format_args!("{}: deployment {id} done (command {command})", verb.word()));
    }
    // The deployment as the finished command left it.
    let now = fleet.get_deployment(GetDeploymentRequest { id }).await.map(tonic::Response::into_inner);
    output::json(&now.unwrap_or(changed))
}

fn show(out: Output, deployment: &Deployment) -> anyhow::Result<()> {
    if out.json { output::json(deployment) } else { table(std::slice::from_ref(deployment)).print() }
}

fn table(deployments: &[Deployment]) -> Table {
    let mut table = Table::new(&["ID", "NAME", "DROPLET", "DESIRED", "STATE", "HEALTH", "IMAGE", "GEN"]);
    for d in deployments {
        let container = d.container.as_ref();
        let mut state = container.map_or("-".to_owned(), |c| output::word(c.state().as_str_name(), "CONTAINER_STATE_"));
        if d.failed {
            state = format!("failed ({state})");
        }
        let health = container
            .and_then(|c| c.health.as_ref())
            .map_or("-".to_owned(), |h| output::word(h.health().as_str_name(), "HEALTH_"));
        table.row(vec![
            d.id.clone(),
            output::or_dash(&d.name),
            d.droplet_id.clone(),
            output::word(d.desired_state().as_str_name(), "DESIRED_STATE_"),
            state,
            health,
            d.spec.as_ref().map_or("-".to_owned(), |s| s.image.clone()),
            d.generation.to_string(),
        ]);
    }
    table
}

fn options(idempotency_key: Option<String>) -> Option<CommandOptions> {
    idempotency_key.map(|key| CommandOptions { idempotency_key: key, deadline: None })
}

/// The spec the `deploy` flags describe. Only the shape is checked here; the control
/// plane validates the rest and names every bad field.
fn spec(args: &DeployArgs) -> anyhow::Result<DeploymentSpec> {
    let mut env = Vec::new();
    for (values, secret) in [(&args.env, false), (&args.secrets, true)] {
        for pair in values {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| Failure::usage(format!("{pair:?}: an environment variable is KEY=VALUE")))?;
            env.push(EnvVar { name: name.to_owned(), value: value.to_owned(), secret });
        }
    }
    let ports = args.ports.iter().map(|p| port(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let volumes = args.volumes.iter().map(|v| volume(v)).collect::<anyhow::Result<Vec<_>>>()?;
    let mcp = args.mcp_port.map(|port| McpEndpoint { port, path: args.mcp_path.clone() });
    let health = match args.health.as_deref() {
        None if mcp.is_some() => Some(Probe::Mcp(McpProbe {})),
        None | Some("none") => None,
        Some(check) => Some(probe(check, args.mcp_port.or(ports.first().map(|p| p.container_port)))?),
    };
    let pull_policy = match args.pull {
        None => PullPolicy::Unspecified,
        Some(Pull::Never) => PullPolicy::Never,
        Some(Pull::IfNotPresent) => PullPolicy::IfNotPresent,
        Some(Pull::Always) => PullPolicy::Always,
    };
    Ok(DeploymentSpec {
        image: args.image.clone(),
        pull_policy: pull_policy as i32,
        args: args.args.clone(),
        env,
        ports,
        volumes,
        health_check: health.map(|probe| HealthCheck { probe: Some(probe), ..Default::default() }),
        mcp,
        ..Default::default()
    })
}

/// `[IP:][HOST:]CONTAINER[/tcp|/udp]`, as `docker run -p` takes it.
fn port(text: &str) -> anyhow::Result<PortPublication> {
    let bad = || Failure::usage(format!("--port {text:?}: expected [IP:][HOST:]CONTAINER[/tcp|/udp]"));
    let (ports, protocol) = match text.rsplit_once('/') {
        None => (text, Protocol::Unspecified),
        Some((ports, "tcp")) => (ports, Protocol::Tcp),
        Some((ports, "udp")) => (ports, Protocol::Udp),
        Some(_) => return Err(bad()),
    };
    let number = |s: &str| if s.is_empty() { Ok(0) } else { s.parse::<u32>().map_err(|_| bad()) };
    let parts: Vec<&str> = ports.split(':').collect();
    let (bind_address, host, container) = match parts.as_slice() {
        [container] => ("", "", *container),
        [host, container] => ("", *host, *container),
        [ip, host, container] => (*ip, *host, *container),
        _ => return Err(bad()),
    };
    Ok(PortPublication {
        container_port: number(container)?,
        host_port: number(host)?,
        protocol: protocol as i32,
        bind_address: bind_address.to_owned(),
    })
}

/// `NAME:PATH[:ro|:rw]`.
fn volume(text: &str) -> anyhow::Result<VolumeMount> {
    let bad = || Failure::usage(format!("--volume {text:?}: expected NAME:PATH[:ro]"));
    let parts: Vec<&str> = text.split(':').collect();
    let (name, path, read_only) = match parts.as_slice() {
        [name, path] => (*name, *path, false),
        [name, path, "ro"] => (*name, *path, true),
        [name, path, "rw"] => (*name, *path, false),
        _ => return Err(bad()),
    };
    Ok(VolumeMount { name: name.to_owned(), container_path: path.to_owned(), read_only })
}

/// `mcp`, `docker`, `http:/PATH` (on `default_port`) or `http:PORT/PATH`.
fn probe(check: &str, default_port: Option<u32>) -> anyhow::Result<Probe> {
    match check {
        "mcp" => Ok(Probe::Mcp(McpProbe {})),
        "docker" => Ok(Probe::Docker(DockerHealth {})),
        _ => {
            let bad = || Failure::usage(format!("--health {check:?}: expected mcp, docker, none or http:[PORT]/PATH"));
            let target = check.strip_prefix("http:").ok_or_else(bad)?;
            let slash = target.find('/').ok_or_else(bad)?;
            let (port, path) = target.split_at(slash);
            let port = match port {
                "" => default_port.ok_or_else(|| {
                    Failure::usage(format!("--health {check:?}: no port: give http:PORT{path}, --mcp-port or --port"))
                })?,
                port => port.parse().map_err(|_| bad())?,
            };
            Ok(Probe::Http(HttpProbe { port, path: path.to_owned(), ..Default::default() }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_like_docker_run() {
        let p = port("8080:80").expect("valid");
        assert_eq!((p.host_port, p.container_port, p.protocol), (8080, 80, Protocol::Unspecified as i32));
        let p = port("127.0.0.1:53:5353/udp").expect("valid");
        assert_eq!((p.bind_address.as_str(), p.host_port, p.container_port), ("127.0.0.1", 53, 5353));
        assert_eq!(p.protocol, Protocol::Udp as i32);
        assert_eq!(port("80").expect("valid").host_port, 0);
        assert!(port("80/sctp").is_err());
        assert!(port("a:b").is_err());
    }

    #[test]
    fn volumes_and_probes_parse() {
        assert!(volume("data:/var/lib/data:ro").expect("valid").read_only);
        assert!(volume("/host/path").is_err());
        assert!(matches!(probe("http:/healthz", Some(8080)), Ok(Probe::Http(HttpProbe { port: 8080, .. }))));
        assert!(matches!(probe("http:9000/ready", None), Ok(Probe::Http(HttpProbe { port: 9000, .. }))));
        assert!(probe("http:/healthz", None).is_err());
        assert!(probe("tcp:80", None).is_err());
    }
}
