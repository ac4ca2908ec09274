//! `flotilla logs`: a deployment's container output, stdout to stdout and stderr to stderr.

use std::{io::Write as _, time::SystemTime};

use anyhow::Context as _;
use flotilla::proto::{TailLogsRequest, log_chunk::Stream};

use crate::{
    args::LogsArgs,
    connect::Fleet,
    exit::Failure,
    output::{self, Output},
};

pub async fn run(fleet: &mut Fleet, out: Output, args: LogsArgs) -> anyhow::Result<()> {
    let since = args.since.as_deref().map(since).transpose()?;
    let request = TailLogsRequest {
        deployment_id: args.deployment,
        tail: args.tail.unwrap_or(0),
        since: since.map(prost_types::Timestamp::from),
        follow: args.follow,
    };
    let mut entries = fleet.tail_logs(request).await?.into_inner();
    while let Some(entry) = entries.message().await? {
        if out.json {
            output::json_line(&entry)?;
            continue;
        }
        if entry.dropped_bytes > 0 {
            eprintln!("flotilla: {} bytes of output dropped here (read too slowly)", entry.dropped_bytes);
        }
        if entry.stream() == Stream::Stderr {
            let mut stderr = std::io::stderr().lock();
            stderr.write_all(&entry.data)?;
            stderr.flush()?;
        } else {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&entry.data)?;
            stdout.flush()?;
        }
    }
    Ok(())
}

/// `10m` (that long ago) or an RFC 3339 instant.
fn since(text: &str) -> anyhow::Result<SystemTime> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now().checked_sub(ago).context("--since: too long ago");
    }
    let at = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|_| Failure::usage(format!("--since {text:?}: expected a duration (10m, 2h) or an RFC 3339 time")))?;
    Ok(SystemTime::from(at.with_timezone(&chrono::Utc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_instants() {
        let then = since("10m").expect("valid");
        let ago = SystemTime::now().duration_since(then).expect("in the past");
        assert!(ago.as_secs() >= 600 && ago.as_secs() < 660, "{ago:?}");
        let at = since("2024-05-01T12:00:00Z").expect("valid");
        assert_eq!(at.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs(), 1_714_564_800);
        assert!(since("yesterday").is_err());
    }
}
