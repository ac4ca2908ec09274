//! `flotilla droplets ...`: list, show, register, re-enroll, label and delete droplets.

use flotilla::proto::{
    CreateDropletRequest, CreateEnrollmentTokenRequest, CreateEnrollmentTokenResponse, DeleteDropletRequest, Droplet,
    DropletStatus, GetDropletRequest, ListDropletsRequest, ListDropletsResponse, UpdateDropletLabelsRequest,
};

use crate::{
    args::{Connection, DropletsCommand, DropletsLs, Install, Status},
    connect::{self, Fleet},
    exit::Failure,
    output::{self, Output, Table},
};

pub async fn run(
    fleet: &mut Fleet,
    out: Output,
    connection: &Connection,
    command: DropletsCommand,
) -> anyhow::Result<()> {
    match command {
        DropletsCommand::Ls(ls) => list(fleet, out, ls).await,
        DropletsCommand::Get { id } => {
            let droplet = fleet.get_droplet(GetDropletRequest { id }).await?.into_inner();
            if out.json { output::json(&droplet) } else { table(&[droplet]).print() }
        }
        DropletsCommand::Create(create) => {
            let mut labels = std::collections::HashMap::new();
            for label in &create.labels {
                let (key, value) = label
                    .split_once('=')
                    .ok_or_else(|| Failure::usage(format!("--label {label:?}: expected key=value")))?;
                labels.insert(key.to_owned(), value.to_owned());
            }
            let request = CreateDropletRequest {
                provider: create.provider,
                name: create.name.unwrap_or_default(),
                labels,
                account: create.account.unwrap_or_default(),
                token_ttl: output::duration(create.ttl),
            };
            let answer = fleet.create_droplet(request).await?.into_inner();
            if out.json {
                return output::json(&answer);
            }
            let droplet = answer.droplet.unwrap_or_default();
            output::line(format_args!(
                "droplet   {}\ntoken     {} (shown only once)\n\nStart the droplet's agent on the host (Docker):\n  {}",
                droplet.id, answer.token, answer.install_command,
            ))
        }
        DropletsCommand::Token(token) => {
            let request = CreateEnrollmentTokenRequest {
                droplet_id: token.id,
                ttl: output::duration(token.ttl),
                ..Default::default()
            };
            let answer = fleet.create_enrollment_token(request).await?.into_inner();
            print_token(out, connection, &token.install, &answer)
        }
        DropletsCommand::Rm { id } => {
            let answer = fleet.delete_droplet(DeleteDropletRequest { id: id.clone() }).await?.into_inner();
            if out.json {
                return output::json(&answer);
            }
            output::line(format_args!(
                "deleted droplet {id} ({} certificate(s) revoked)",
                answer.revoked_certificate_serials.len()
            ))
        }
        DropletsCommand::Label { id, changes } => {
            let mut labels = fleet.get_droplet(GetDropletRequest { id: id.clone() }).await?.into_inner().labels;
            for change in &changes {
                match (change.split_once('='), change.strip_suffix('-')) {
                    (Some((key, value)), _) => {
                        labels.insert(key.to_owned(), value.to_owned());
                    }
                    (None, Some(key)) => {
                        labels.remove(key);
                    }
                    (None, None) => {
                        return Err(Failure::usage(format!(
                            "{change:?}: give KEY=VALUE to set a label or KEY- to remove it"
                        )));
                    }
                }
            }
            let droplet = fleet.update_droplet_labels(UpdateDropletLabelsRequest { id, labels }).await?.into_inner();
            if out.json { output::json(&droplet) } else { table(&[droplet]).print() }
        }
    }
}

async fn list(fleet: &mut Fleet, out: Output, ls: DropletsLs) -> anyhow::Result<()> {
    let request = ListDropletsRequest {
        page_size: ls.page_size,
        page_token: String::new(),
        status: ls.status.map_or(DropletStatus::Unspecified, status) as i32,
        account: ls.account.unwrap_or_default(),
        label_selector: ls.selector.unwrap_or_default(),
    };
    let droplets = connect::every_page(|page_token| {
        let (mut fleet, request) = (fleet.clone(), ListDropletsRequest { page_token, ..request.clone() });
        async move {
            let page = fleet.list_droplets(request).await?.into_inner();
            Ok((page.droplets, page.next_page_token))
        }
    })
    .await?;
    if out.json {
        return output::json(&ListDropletsResponse { droplets, next_page_token: String::new() });
    }
    table(&droplets).print()
}

fn status(status: Status) -> DropletStatus {
    match status {
        Status::Pending => DropletStatus::Pending,
        Status::Provisioning => DropletStatus::Provisioning,
        Status::Online => DropletStatus::Online,
        Status::Unreachable => DropletStatus::Unreachable,
        Status::Offline => DropletStatus::Offline,
        Status::Error => DropletStatus::Error,
        Status::Deleting => DropletStatus::Deleting,
    }
}

fn table(droplets: &[Droplet]) -> Table {
    let mut table = Table::new(&["ID", "STATUS", "ACCOUNT", "HOSTNAME", "AGENT", "LAST SEEN", "LABELS"]);
    for d in droplets {
        let mut state = output::word(d.status().as_str_name(), "DROPLET_STATUS_");
        if !d.status_message.is_empty() {
            state = format!("{state} ({})", d.status_message);
        }
        table.row(vec![
            d.id.clone(),
            state,
            d.account.clone(),
            output::or_dash(d.host.as_ref().map_or("", |h| h.hostname.as_str())),
            output::or_dash(&d.agent_version),
            output::ago(d.last_seen_at.as_ref()),
            output::labels(&d.labels),
        ]);
    }
    table
}

fn print_token(
    out: Output,
    connection: &Connection,
    install: &Install,
    answer: &CreateEnrollmentTokenResponse,
) -> anyhow::Result<()> {
    if out.json {
        return output::json(answer);
    }
    let token = answer.enrollment_token.clone().unwrap_or_default();
    let agent_url = match &install.agent_url {
        Some(url) => url.clone(),
        None => default_agent_url(connection.url.as_deref().unwrap_or_default()),
    };
    output::line(format_args!(
        "droplet   {}\ntoken     {}\nexpires   {} (the token is shown only once)\n\nStart the droplet's agent on the machine (Docker):\n  {}",
        token.droplet_id,
        answer.token,
        output::time(token.expires_at.as_ref()),
        install_command(&install.agent_image, &agent_url, &answer.token),
    ))
}

/// The control plane's agent port: the API's host, port 7443, always TLS.
fn default_agent_url(api_url: &str) -> String {
    let host = api_url.parse::<tonic::transport::Uri>().ok().and_then(|u| u.host().map(str::to_owned));
    format!("https://{}:7443", host.as_deref().unwrap_or("CONTROL-PLANE-HOST"))
}

/// A one-line `docker run` that starts the agent with `token`, keeping its credentials in
/// a volume at the agent's default state dir.
fn install_command(image: &str, agent_url: &str, token: &str) -> String {
    format!(
        "docker run -d --name flotilla-agent --restart unless-stopped \
         -v /var/run/docker.sock:/var/run/docker.sock -v flotilla-agent:/var/lib/flotilla-agent \
         -e FLOTILLA_CONTROL_PLANE={agent_url} -e FLOTILLA_TOKEN={token} {image}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_url_is_the_api_host_on_7443() {
        assert_eq!(default_agent_url("http://127.0.0.1:7080"), "https://127.0.0.1:7443");
        assert_eq!(default_agent_url("https://cp.example.com:7080"), "https://cp.example.com:7443");
    }

    #[test]
    fn the_install_command_is_one_line() {
        let command = install_command("flotilla-agent:latest", "https://cp:7443", "tok");
        assert!(!command.contains('\n'));
        assert!(
            command.ends_with("-e FLOTILLA_CONTROL_PLANE=https://cp:7443 -e FLOTILLA_TOKEN=tok flotilla-agent:latest")
        );
    }
}
