//! What the CLI prints: proto3 JSON (the same documents grpcurl and the HTTP API print),
//! or aligned tables and short words for people.

use std::{
    io::Write as _,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use flotilla::proto;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// How answers are printed.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

/// A message the CLI prints as JSON, with its full protobuf name.
pub trait Named: prost::Message + Sized {
    const NAME: &'static str;
}

macro_rules! named {
    ($($ty:ident),* $(,)?) => {
        $(impl Named for proto::$ty {
            const NAME: &'static str = concat!("flotilla.v1.", stringify!($ty));
        })*
    };
}

named!(
    CommandRecord,
    CreateEnrollmentTokenResponse,
    CreateDropletResponse,
    DeleteDropletResponse,
    Deployment,
    Droplet,
    Event,
    ListDeploymentsResponse,
    ListDropletsResponse,
    ListToolsResponse,
    LogEntry,
);

fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).context("decoding the API's descriptors")?;
    Ok(POOL.get_or_init(|| pool))
}

/// `message` in the proto3 JSON mapping, with the HTTP API's options.
pub fn to_json<M: Named>(message: &M) -> anyhow::Result<serde_json::Value> {
    let descriptor = pool()?.get_message_by_name(M::NAME).with_context(|| format!("{} is not in the API", M::NAME))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .with_context(|| format!("re-decoding a {}", M::NAME))?;
    Ok(dynamic.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())?)
}

/// One answer, indented, as grpcurl prints it.
pub fn json<M: Named>(message: &M) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&to_json(message)?)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}

/// One message of a stream, on one line, flushed at once so a pipe sees it.
pub fn json_line<M: Named>(message: &M) -> anyhow::Result<()> {
    let text = serde_json::to_string(&to_json(message)?)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// Prints a line to stdout, failing (rather than panicking) on a closed pipe.
pub fn line(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// Columns aligned on the widest cell, as `docker ps` prints them.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|h| (*h).to_owned()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|cell| cell.chars().count()).max().unwrap_or(0))
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < row.len() {
                    let pad = widths[c] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    pub fn print(&self) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(self.render().as_bytes())?;
        Ok(())
    }
}

/// An enum value's protobuf name as a word: `DROPLET_STATUS_ONLINE` → `online`.
pub fn word(name: &str, prefix: &str) -> String {
    let word = name.strip_prefix(prefix).unwrap_or(name);
    if word == "UNSPECIFIED" { "-".to_owned() } else { word.to_lowercase().replace('_', "-") }
}

/// `-` for an empty cell.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() { "-".to_owned() } else { text.to_owned() }
}

/// How long ago `at` was, in the largest whole unit: `5s`, `3m`, `2h`, `4d`.
pub fn ago(at: Option<&prost_types::Timestamp>) -> String {
    let Some(at) = at.and_then(|t| SystemTime::try_from(*t).ok()) else { return "-".to_owned() };
    let elapsed = SystemTime::now().duration_since(at).unwrap_or(Duration::ZERO).as_secs();
    match elapsed {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// A timestamp in RFC 3339, to the second, in UTC.
pub fn time(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// `key=value,key=value`, sorted.
pub fn labels(labels: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    or_dash(&pairs.join(","))
}

/// A protobuf duration from a std one (all the CLI's flags fit).
pub fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let mut table = Table::new(&["ID", "STATUS"]);
        table.row(vec!["a-long-id".into(), "online".into()]);
        table.row(vec!["b".into(), "-".into()]);
        assert_eq!(table.render(), "ID          STATUS\na-long-id   online\nb           -\n");
    }

    #[test]
    fn enum_names_become_words() {
        assert_eq!(word("DROPLET_STATUS_ONLINE", "DROPLET_STATUS_"), "online");
        assert_eq!(word("CONTAINER_STATE_CRASH_LOOPING", "CONTAINER_STATE_"), "crash-looping");
        assert_eq!(word("HEALTH_UNSPECIFIED", "HEALTH_"), "-");
    }

    #[test]
    fn json_is_the_proto3_mapping() {
        let droplet = proto::Droplet {
            id: "d1".into(),
            status: proto::DropletStatus::Online as i32,
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        };
        let json = to_json(&droplet).expect("a droplet serializes");
        assert_eq!(json, serde_json::json!({"id": "d1", "status": "DROPLET_STATUS_ONLINE", "labels": {"zone": "a"}}));
    }
}
