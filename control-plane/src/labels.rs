//! Droplet labels, and the selectors that filter droplets by them.
//!
//! Selectors use the equality-based subset of Kubernetes' label selectors, which most
//! operators already know: `tier=edge,region!=fra1,gpu,!draining`.

use std::collections::BTreeMap;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// All requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<Requirement>);

pub const MAX_LABELS: usize = 64;
const MAX_VALUE: usize = 255;

/// Why a label key is not one.
fn key_error(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    (!ok).then(|| {
        format!("{key:?} is not a label key (1-63 of A-Z a-z 0-9 . _ - /, starting and ending with a letter or digit)")
    })
}

fn value_error(key: &str, value: &str) -> Option<String> {
    (value.chars().count() > MAX_VALUE || value.chars().any(char::is_control))
        .then(|| format!("the value of {key:?} must be at most {MAX_VALUE} characters, with no control characters"))
}

/// Every problem with a set of labels, one message each.
pub fn validate(labels: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    if labels.len() > MAX_LABELS {
        problems.push(format!("at most {MAX_LABELS} labels, got {}", labels.len()));
    }
    for (key, value) in labels {
        problems.extend(key_error(key));
        problems.extend(value_error(key, value));
    }
    problems
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                if text.trim().is_empty() {
                    break;
                }
                return Err(format!("{text:?} has an empty requirement"));
            }
            let requirement = if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = part.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some(key) = part.strip_prefix('!') {
                Requirement::Absent(key.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let (Requirement::Equals(key, _)
            | Requirement::NotEquals(key, _)
            | Requirement::Exists(key)
            | Requirement::Absent(key)) = &requirement;
            if let Some(problem) = key_error(key) {
                return Err(problem);
            }
            if let Requirement::Equals(key, value) | Requirement::NotEquals(key, value) = &requirement
                && let Some(problem) = value_error(key, value)
            {
                return Err(problem);
            }
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }
}

impl Selector {
    /// Adds the selector's conditions on the jsonb column `labels` to a query.
    pub fn push_sql(&self, query: &mut sqlx::QueryBuilder<'_, sqlx::Postgres>) {
        for requirement in &self.0 {
            match requirement {
                Requirement::Equals(key, value) => {
                    query.push(" AND labels @> ").push_bind(pair(key, value));
                }
                Requirement::NotEquals(key, value) => {
                    query.push(" AND NOT labels @> ").push_bind(pair(key, value));
                }
                Requirement::Exists(key) => {
                    query.push(" AND labels ? ").push_bind(key.clone());
                }
                Requirement::Absent(key) => {
                    query.push(" AND NOT labels ? ").push_bind(key.clone());
                }
            }
        }
    }
}

fn pair(key: &str, value: &str) -> sqlx::types::Json<BTreeMap<String, String>> {
    sqlx::types::Json(BTreeMap::from([(key.to_owned(), value.to_owned())]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Requirement::*;

    #[test]
    fn selectors_parse() {
        let parsed: Selector = "tier=edge, region!=fra1,gpu,!draining,env==prod".parse().expect("valid");
        assert_eq!(
            parsed.0,
            [
                Equals("tier".into(), "edge".into()),
                NotEquals("region".into(), "fra1".into()),
                Exists("gpu".into()),
                Absent("draining".into()),
                Equals("env".into(), "prod".into()),
            ]
        );
        assert_eq!("".parse::<Selector>(), Ok(Selector::default()));
        for bad in ["a,,b", "=x", "!", "-a=b", "a b=c", ","] {
            assert!(bad.parse::<Selector>().is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_are_checked() {
        let good = BTreeMap::from([("dev.flotilla/role".to_owned(), "edge".to_owned())]);
        assert!(validate(&good).is_empty());
        let bad = BTreeMap::from([("-x".to_owned(), "v".to_owned()), ("y".to_owned(), "a\nb".to_owned())]);
        let problems = validate(&bad);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("\"-x\" is not a label key"));
        assert!(problems[1].contains("value of \"y\""));
    }
}
