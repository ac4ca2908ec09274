//! Droplets: made (brought by their owner, or by a provider), labelled and deleted, and
//! the one-time tokens they enroll with.

use std::{collections::BTreeMap, time::Duration};

use flotilla::DropletId;
use uuid::Uuid;

use crate::{
    fleet::{
        Fleet,
        provisioning::{self, cloudinit},
    },
    identity::enrollment::{self, CreateError},
    labels,
    store::{self, DropletRow, TokenCreateError},
};

/// Why a droplet change was refused.
#[derive(Debug, thiserror::Error)]
pub enum DropletError {
    #[error("provider: {name:?} is not a provider of this control plane ({})", known.join(", "))]
    UnknownProvider { name: String, known: Vec<String> },
    #[error("labels: {}", .0.join("; "))]
    BadLabels(Vec<String>),
    #[error("account: {0:?} does not exist")]
    NoAccount(String),
    #[error("droplet {0} not found")]
    NotFound(Uuid),
    #[error("droplet_id: droplet {0} is being deleted")]
    Deleting(Uuid),
    #[error(transparent)]
    Token(CreateError),
    /// The control plane's own settings make user data that cannot work.
    #[error("the control plane's droplet settings: {0}")]
    Settings(#[from] cloudinit::UserDataError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<CreateError> for DropletError {
    fn from(error: CreateError) -> Self {
        match error {
            CreateError::Store(TokenCreateError::Database(error)) => DropletError::Database(error),
            CreateError::Store(TokenCreateError::OtherAccount(id)) => DropletError::NotFound(id),
            CreateError::Store(TokenCreateError::NoAccount(account)) => DropletError::NoAccount(account),
            CreateError::Store(TokenCreateError::Deleting(id)) => DropletError::Deleting(id),
            invalid => DropletError::Token(invalid),
        }
    }
}

/// Labels as given, checked.
fn checked_labels(
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, DropletError> {
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    let problems = labels::validate(&labels);
    if problems.is_empty() { Ok(labels) } else { Err(DropletError::BadLabels(problems)) }
}

/// A droplet its owner brings: `pending`, with its one-time token and the command that
/// starts its agent.
pub struct Brought {
    pub row: DropletRow,
    /// Shown once.
    pub token: String,
    pub install_command: String,
}

/// How a new droplet is made.
pub enum Make {
    /// By its owner, who runs the agent with the token.
    Bring { name: String, token_ttl: Duration },
    /// By a provider, in the background.
    Provider(String),
}

/// What `create` made.
pub enum Made {
    Brought(Brought),
    /// `provisioning`: a job makes its machine.
    Provisioning(DropletRow),
}

/// Makes a droplet in `account`.
pub async fn create(
    fleet: &Fleet,
    account: &str,
    make: Make,
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<Made, DropletError> {
    if let Make::Provider(name) = &make
        && name != "byo"
        && fleet.providers.get(name).is_none()
    {
        let mut known = vec!["byo".to_owned()];
        known.extend(fleet.providers.names().into_iter().map(str::to_owned));
        return Err(DropletError::UnknownProvider { name: name.clone(), known });
    }
    let labels = checked_labels(labels)?;
    let (name, ttl) = match make {
        Make::Provider(name) if name != "byo" => {
            let timeout = fleet.provision_timeout;
            let row =
                provisioning::begin_create(&fleet.db, account, &name, &labels, timeout).await.map_err(|error| {
                    match error {
                        sqlx::Error::Database(e) if e.is_foreign_key_violation() => {
                            DropletError::NoAccount(account.to_owned())
                        }
                        other => DropletError::Database(other),
                    }
                })?;
            return Ok(Made::Provisioning(row));
        }
        Make::Provider(_) => (String::new(), enrollment::DEFAULT_TTL),
        Make::Bring { name, token_ttl } => (name, token_ttl),
    };
    let ca = &fleet.authorities.active;
    let created = enrollment::create(&fleet.db, ca, account, None, &name, ttl).await?;
    let droplet = created.row.droplet_id;
    let row = store::set_labels(&fleet.db, droplet, &labels).await?.ok_or(DropletError::NotFound(droplet))?;
    let endpoints = &fleet.endpoints;
    let options = cloudinit::UserDataOptions::new(
        endpoints.agent.clone(),
        endpoints.enroll.clone(),
        created.token.clone(),
        ca.sha256_pin(),
        endpoints.agent_image.clone(),
    );
    let install_command = cloudinit::install_command(&options)?;
    Ok(Made::Brought(Brought { row, token: created.token, install_command }))
}

/// A one-time token for `droplet` (a new droplet when `None`) in `account`, or in the
/// droplet's own account when it exists.
pub async fn create_token(
    fleet: &Fleet,
    account: &str,
    droplet: Option<Uuid>,
    name: &str,
    ttl: Duration,
) -> Result<enrollment::Created, DropletError> {
    let account = match droplet {
        // A token for an existing droplet is in the droplet's account.
        Some(droplet) => store::get_droplet(&fleet.db, droplet).await?.ok_or(DropletError::NotFound(droplet))?.account,
        None => account.to_owned(),
    };
    let ca = &fleet.authorities.active;
    let created = enrollment::create(&fleet.db, ca, &account, droplet.map(DropletId::from_uuid), name, ttl).await?;
    Ok(created)
}

/// Deletes a droplet: its certificates are revoked at once (its session closes
/// everywhere). A provider's droplet stays `deleting` until a job has destroyed its
/// machine; any other goes now. Returns the revoked serials.
pub async fn delete(fleet: &Fleet, id: Uuid) -> Result<Vec<String>, DropletError> {
    let provider = store::droplet_provider(&fleet.db, id).await?;
    if provider.as_deref().is_some_and(|p| p != "byo") {
        let revoked = provisioning::begin_delete(&fleet.db, id).await?;
        tracing::info!(droplet_id = %id, "droplet deleting");
        return Ok(revoked);
    }
    let revoked = store::delete_droplet(&fleet.db, id).await?.ok_or(DropletError::NotFound(id))?;
    tracing::info!(droplet_id = %id, certificates = revoked.len(), "droplet deleted");
    Ok(revoked)
}

/// Replaces a droplet's labels.
pub async fn set_labels(
    fleet: &Fleet,
    id: Uuid,
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<DropletRow, DropletError> {
    let labels = checked_labels(labels)?;
    store::set_labels(&fleet.db, id, &labels).await?.ok_or(DropletError::NotFound(id))
}
