//! Every domain error as a gRPC `Status`, in one place. Internal details are logged here
//! and never sent to the caller.

use tonic::Status;

use crate::{
    api::auth::keys::KeyError,
    fleet::{deployments, droplets},
};

/// Database failures are logged here and reach the client only as `Unavailable`; a text
/// holding a NUL character (which PostgreSQL cannot store) is the caller's mistake.
pub fn db_error(error: sqlx::Error) -> Status {
    if let sqlx::Error::Database(e) = &error
        && e.code().as_deref() == Some("22021")
    {
        return Status::invalid_argument("a text field holds a NUL character, which cannot be stored");
    }
    tracing::error!(%error, "database error");
    Status::unavailable("the control plane's database is unavailable; try again")
}

/// `InvalidArgument` naming every bad field in the message and, for programs, as a
/// `google.rpc.BadRequest` detail (one field violation each).
pub fn invalid_spec(invalid: &flotilla::spec::SpecError) -> Status {
    use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};
    let violations: Vec<FieldViolation> = invalid
        .violations
        .iter()
        .map(|v| FieldViolation::new(format!("spec.{}", v.field), v.description.clone()))
        .collect();
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        invalid.to_string(),
        ErrorDetails::with_bad_request(violations),
    )
}

pub fn deployment_status(error: deployments::DeploymentError) -> Status {
    use deployments::DeploymentError as E;
    match error {
        E::Invalid(invalid) => invalid_spec(&invalid),
        E::NoDroplet(_) | E::NotFound(_) => Status::not_found(error.to_string()),
        E::Removed(_) => Status::failed_precondition(error.to_string()),
        E::KeyReused => Status::already_exists(error.to_string()),
        E::Unreadable(_) => {
            tracing::error!(%error, "unreadable deployment");
            Status::internal("the deployment's stored spec cannot be read")
        }
        E::Database(error) => db_error(error),
    }
}

/// `InvalidArgument` with one `BadRequest` field violation per problem.
pub fn bad_fields(field: &str, problems: &[String]) -> Status {
    use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};
    let violations: Vec<FieldViolation> = problems.iter().map(|p| FieldViolation::new(field, p.clone())).collect();
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {}", problems.join("; ")),
        ErrorDetails::with_bad_request(violations),
    )
}

/// A droplet change refused, as a status. Labels and the account are the caller's to fix;
/// the control plane's own droplet settings are the operator's.
pub fn droplet_status(error: droplets::DropletError) -> Status {
    use droplets::DropletError as E;
    match error {
        E::UnknownProvider { .. } | E::Token(_) => Status::invalid_argument(error.to_string()),
        E::BadLabels(problems) => bad_fields("labels", &problems),
        E::NoAccount(_) | E::NotFound(_) => Status::not_found(error.to_string()),
        E::Deleting(_) => Status::failed_precondition(error.to_string()),
        E::Settings(_) => {
            tracing::error!(%error, "the control plane's own droplet settings are not valid");
            Status::failed_precondition(error.to_string())
        }
        E::Database(error) => db_error(error),
    }
}

/// An API key refused, as a status.
pub fn key_status(error: KeyError) -> Status {
    match error {
        KeyError::Database(error) => db_error(error),
        invalid => Status::invalid_argument(invalid.to_string()),
    }
}
