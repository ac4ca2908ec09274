//! Exit codes scripts can rely on, and the one line that says what went wrong.

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// The process's exit code. The numbers are part of the CLI's interface: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Anything not listed below.
    Error = 1,
    /// Bad flags or configuration (no URL or key, unreadable CA file). clap uses 2 too.
    Usage = 2,
    /// UNAUTHENTICATED or PERMISSION_DENIED.
    Denied = 3,
    /// NOT_FOUND (also another account's resource).
    NotFound = 4,
    /// INVALID_ARGUMENT or OUT_OF_RANGE.
    Invalid = 5,
    /// ALREADY_EXISTS, FAILED_PRECONDITION or ABORTED (e.g. the droplet has no session).
    Conflict = 6,
    /// UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED: worth retrying later.
    Unavailable = 7,
    /// The command ended failed, expired or cancelled, or the deployment failed
    /// (crash-looping, unhealthy).
    Failed = 8,
    /// `--timeout` passed before the change was carried out.
    Timeout = 9,
}

/// An error that knows its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn of(exit: Exit, message: impl Into<String>) -> anyhow::Error {
        Self { exit, message: message.into() }.into()
    }

    pub fn usage(message: impl Into<String>) -> anyhow::Error {
        Self::of(Exit::Usage, message)
    }
}

pub fn of_code(code: Code) -> Exit {
    match code {
        Code::Unauthenticated | Code::PermissionDenied => Exit::Denied,
        Code::NotFound => Exit::NotFound,
        Code::InvalidArgument | Code::OutOfRange => Exit::Invalid,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => Exit::Conflict,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => Exit::Unavailable,
        _ => Exit::Error,
    }
}

/// The exit code and the one-line message for `error`. A closed stdout (`| head`) is no
/// error: code 0, no message.
pub fn describe(error: &anyhow::Error) -> (u8, String) {
    for cause in error.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return (failure.exit as u8, failure.message.clone());
        }
        if let Some(status) = cause.downcast_ref::<Status>() {
            return (of_code(status.code()) as u8, status_line(status));
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::BrokenPipe
        {
            return (0, String::new());
        }
    }
    (Exit::Error as u8, format!("{error:#}"))
}

/// `not found: deployment 0190… does not exist`, with each field violation of a
/// `google.rpc.BadRequest` detail that the message does not already say.
pub fn status_line(status: &Status) -> String {
    let mut line = format!("{}: {}", code_name(status.code()), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for violation in &bad.field_violations {
            if !status.message().contains(&violation.description) {
                line.push_str(&format!("; {}: {}", violation.field, violation.description));
            }
        }
    }
    line
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, FieldViolation};

    use super::*;

    #[test]
    fn codes_map_to_distinct_exits() {
        assert_eq!(of_code(Code::Unauthenticated), Exit::Denied);
        assert_eq!(of_code(Code::NotFound), Exit::NotFound);
        assert_eq!(of_code(Code::InvalidArgument), Exit::Invalid);
        assert_eq!(of_code(Code::FailedPrecondition), Exit::Conflict);
        assert_eq!(of_code(Code::Unavailable), Exit::Unavailable);
        assert_eq!(of_code(Code::Internal), Exit::Error);
    }

    #[test]
    fn field_violations_are_added_once() {
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "spec.image: must not be empty",
            ErrorDetails::with_bad_request(vec![
                FieldViolation::new("spec.image", "must not be empty"),
                FieldViolation::new("ports[0].host_port", "0 is not a port"),
            ]),
        );
        let error = anyhow::Error::from(status);
        assert_eq!(
            describe(&error),
            (5, "invalid argument: spec.image: must not be empty; ports[0].host_port: 0 is not a port".into())
        );
    }

    #[test]
    fn a_closed_pipe_is_success() {
        let error = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(describe(&error), (0, String::new()));
    }
}
