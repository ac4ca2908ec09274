//! `flotilla events`: what happens in the fleet, one line per event.

use flotilla::proto::{Event, WatchEventsRequest};

use crate::{
    args::EventsArgs,
    connect::Fleet,
    output::{self, Output},
};

pub async fn run(fleet: &mut Fleet, out: Output, args: EventsArgs) -> anyhow::Result<()> {
    // Without --follow the useful answer is the history; with it, what happens next.
    let from_oldest = args.from_oldest || (!args.follow && args.since_cursor.is_none());
    let request = WatchEventsRequest {
        droplet_id: args.droplet.unwrap_or_default(),
        deployment_id: args.deployment.unwrap_or_default(),
        kinds: args.kinds,
        account: args.account.unwrap_or_default(),
        cursor: args.since_cursor.unwrap_or_default(),
        from_oldest,
        follow: args.follow,
    };
    let mut events = fleet.watch_events(request).await?.into_inner();
    while let Some(event) = events.message().await? {
        if out.json {
            output::json_line(&event)?;
        } else {
            output::line(line(&event))?;
        }
    }
    Ok(())
}

/// `2024-05-01T12:00:00Z  container.start          <deployment or droplet>  message`
fn line(event: &Event) -> String {
    let subject = match (event.deployment_id.as_str(), event.droplet_id.as_str()) {
        ("", "") => "-",
        ("", droplet) => droplet,
        (deployment, _) => deployment,
    };
    format!("{}  {:<24} {:<36}  {}", output::time(event.at.as_ref()), event.kind, subject, event.message)
        .trim_end()
        .to_owned()
}
