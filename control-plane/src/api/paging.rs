//! Pages of lists: `page_size` within bounds, and opaque page tokens. A token is one
//! scheme for every list: base64 of `<list>/<keyset position>`, so pages stay stable while
//! rows are added and a token of one list is refused by another.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use tonic::Status;
use uuid::Uuid;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

/// The lists that page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Droplets,
    Deployments,
    Commands,
}

impl List {
    fn name(self) -> &'static str {
        match self {
            List::Droplets => "droplets",
            List::Deployments => "deployments",
            List::Commands => "commands",
        }
    }
}

/// `page_size` as asked, within bounds.
pub fn page_size(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(Status::invalid_argument(format!("page_size: at most {MAX_PAGE_SIZE}, got {n}"))),
        n => Ok(n),
    }
}

/// Cuts `rows` (one more than a page was read) to a page; the token of the next page when
/// more rows follow, else empty.
pub fn next_page<T>(rows: &mut Vec<T>, size: u32, list: List, position_of: impl Fn(&T) -> String) -> String {
    let more = rows.len() > size as usize;
    rows.truncate(size as usize);
    match rows.last() {
        Some(last) if more => encode(list, &position_of(last)),
        _ => String::new(),
    }
}

fn encode(list: List, position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}/{position}", list.name()))
}

fn invalid() -> Status {
    Status::invalid_argument("page_token: not a token this server issued")
}

/// The keyset position in a token of `list`; `None` for the first page (no token).
fn decode(list: List, token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let position = text.strip_prefix(list.name()).and_then(|rest| rest.strip_prefix('/')).ok_or_else(invalid)?;
    Ok(Some(position.to_owned()))
}

/// A position that is an id (lists in id order).
pub fn after_id(list: List, token: &str) -> Result<Option<Uuid>, Status> {
    decode(list, token)?.map(|id| Uuid::try_parse(&id).map_err(|_| invalid())).transpose()
}

/// A position that is `(created_at, id)` (lists newest first).
pub fn before_instant(list: List, token: &str) -> Result<Option<(DateTime<Utc>, Uuid)>, Status> {
    let Some(position) = decode(list, token)? else { return Ok(None) };
    let (micros, id) = position.split_once('/').ok_or_else(invalid)?;
    let at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(invalid)?;
    Ok(Some((at, Uuid::try_parse(id).map_err(|_| invalid())?)))
}

/// The position of a row listed newest first.
pub fn instant_position(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}/{id}", at.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::new_v4();
        assert_eq!(after_id(List::Droplets, &encode(List::Droplets, &id.to_string())).ok(), Some(Some(id)));
        assert_eq!(after_id(List::Droplets, "").ok(), Some(None));
        let other = encode(List::Deployments, &id.to_string());
        for bad in ["!!!", "ZHJvcGxldHM", &URL_SAFE_NO_PAD.encode("droplets/nope"), &other] {
            let status = after_id(List::Droplets, bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with("page_token"));
        }
    }

    #[test]
    fn newest_first_positions_round_trip() {
        let (at, id) = (DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("instant"), Uuid::new_v4());
        let token = encode(List::Commands, &instant_position(at, id));
        assert_eq!(before_instant(List::Commands, &token).ok(), Some(Some((at, id))));
        assert!(before_instant(List::Droplets, &token).is_err(), "a token of another list");
        assert!(before_instant(List::Commands, &encode(List::Commands, "12/not-an-id")).is_err());
    }
}
