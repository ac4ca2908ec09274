//! Protocol versions and the rule for which peers may talk.
//!
//! A control plane talks to agents one minor version behind or ahead of its own, and
//! refuses others with a `Goodbye` naming the version to run.

use crate::proto::{ProtocolVersion, command};

/// The protocol this build speaks.
pub const CURRENT: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

/// Whether a peer speaking `theirs` may hold a session with one speaking `ours`.
pub fn compatible(ours: &ProtocolVersion, theirs: &ProtocolVersion) -> bool {
    ours.major == theirs.major && ours.minor.abs_diff(theirs.minor) <= 1
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl command::Kind {
    /// The kind's name in the ledger, events and logs: "deploy", "stop", "fetch-logs", ...
    pub fn name(&self) -> &'static str {
        match self {
            Self::Deploy(_) => "deploy",
            Self::Start(_) => "start",
            Self::Stop(_) => "stop",
            Self::Restart(_) => "restart",
            Self::Remove(_) => "remove",
            Self::CheckHealth(_) => "check-health",
            Self::FetchLogs(_) => "fetch-logs",
            Self::CancelLogs(_) => "cancel-logs",
            Self::Inspect(_) => "inspect",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> ProtocolVersion {
        ProtocolVersion { major, minor }
    }

    #[test]
    fn one_minor_version_apart_is_compatible() {
        assert!(compatible(&v(1, 4), &v(1, 4)));
        assert!(compatible(&v(1, 4), &v(1, 3)));
        assert!(compatible(&v(1, 4), &v(1, 5)));
    }

    #[test]
    fn two_minors_or_another_major_is_not() {
        assert!(!compatible(&v(1, 4), &v(1, 2)));
        assert!(!compatible(&v(1, 4), &v(1, 6)));
        assert!(!compatible(&v(1, 0), &v(2, 0)));
        assert!(!compatible(&v(2, 0), &v(1, 0)));
    }
}
