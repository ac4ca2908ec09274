//! Droplets made and destroyed by providers, as durable jobs.
//!
//! `CreateDroplet` with a provider writes the droplet (`provisioning`) and a `create` job in
//! one transaction and returns. Any replica takes a due job under a lease it renews; if it
//! dies, the lease runs out and another replica takes the job over. Every step can run
//! again: a machine whose creation was not recorded is found by its droplet id before a
//! new one is made, and a fresh one-time token is minted only for a machine about to be
//! made. The droplet turns `online` when its agent connects; if that has not happened by
//! the job's deadline, or the provider refuses for good, the droplet is `error` with the
//! reason and everything made for it (machines, unused tokens) is cleaned up.
//!
//! Deleting a provider's droplet revokes its certificates at once (its session closes),
//! marks it `deleting` and leaves a `delete` job that destroys the machine, retried with
//! back-off and the provider's error shown on the droplet until it succeeds; only then is
//! the droplet's row removed. Nothing is leaked silently.

pub mod cloudinit;
pub mod digitalocean;
pub mod local;
pub mod provider;

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use flotilla::DropletId;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::{
    cloudinit::UserDataOptions,
    provider::{Backoff, CloudId, CreateSpec, Provider, ProviderError},
};
use crate::{fleet::Fleet, identity::enrollment, store};

/// A job's lease; renewed at a third of it while the job runs.
const LEASE: Duration = Duration::from_secs(30);
/// How often each replica looks for due jobs.
const POLL: Duration = Duration::from_millis(500);
const RETRY: Backoff = Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(300) };

/// The providers this control plane may use, by name.
#[derive(Clone, Default)]
pub struct Providers(HashMap<&'static str, Arc<dyn Provider>>);

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Providers {
    pub fn with(mut self, name: &'static str, provider: Arc<dyn Provider>) -> Self {
        self.0.insert(name, provider);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.0.keys().copied().collect();
        names.sort_unstable();
        names
    }
}

/// A new droplet of `provider`, `provisioning`, with its create job. Returns the row.
pub async fn begin_create(
    db: &PgPool,
    account: &str,
    provider: &str,
    labels: &std::collections::BTreeMap<String, String>,
    timeout: Duration,
) -> sqlx::Result<store::DropletRow> {
    store::insert_provisioning_droplet(db, DropletId::new().as_uuid(), account, provider, labels, timeout).await
}

/// Revokes the droplet's certificates (its session closes everywhere), marks it
/// `deleting` and leaves the job that destroys its machine. Returns the revoked serials.
pub async fn begin_delete(db: &PgPool, id: Uuid) -> sqlx::Result<Vec<String>> {
    store::begin_droplet_delete(db, id).await
}

/// Takes due jobs and works them until `stop`.
pub fn spawn(fleet: &Fleet, stop: &CancellationToken, tasks: &mut JoinSet<()>) {
    let (fleet, stop) = (fleet.clone(), stop.clone());
    tasks.spawn(async move {
        let mut running = JoinSet::new();
        loop {
            match store::claim_job(&fleet.db, fleet.replica, LEASE).await {
                Ok(Some(job)) => {
                    let (fleet, stop) = (fleet.clone(), stop.clone());
                    running.spawn(async move { work(&fleet, job, &stop).await });
                    continue;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "could not look for provisioning jobs"),
            }
            while running.try_join_next().is_some() {}
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(POLL) => {}
            }
        }
        // Leases run out and another replica goes on where these stop.
        running.shutdown().await;
    });
}

/// What a step ended with.
enum Outcome {
    Done,
    /// Try again after a back-off; the error is shown on the droplet meanwhile.
    Retry(String),
    /// Give up: the droplet is `error` with this reason, and what was made is removed.
    Failed(String),
}

async fn work(fleet: &Fleet, job: store::Job, stop: &CancellationToken) {
    let droplet = job.droplet_id;
    // Keeps the lease while the step runs.
    let renew = {
        let (db, replica) = (fleet.db.clone(), fleet.replica);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                if let Err(error) = store::renew_lease(&db, droplet, replica, LEASE).await {
                    tracing::warn!(%error, droplet_id = %droplet, "could not renew a provisioning lease");
                }
            }
        })
    };
    let outcome = tokio::select! {
        outcome = step(fleet, &job) => outcome,
        () = stop.cancelled() => { renew.abort(); return; }
    };
    renew.abort();
    let recorded = match outcome {
        Ok(outcome) => record(fleet, &job, outcome).await,
        Err(error) => record(fleet, &job, Outcome::Retry(format!("database: {error}"))).await,
    };
    if let Err(error) = recorded {
        tracing::warn!(%error, droplet_id = %droplet, "could not record a provisioning step; its lease will run out");
    }
}

async fn record(fleet: &Fleet, job: &store::Job, outcome: Outcome) -> sqlx::Result<()> {
    let droplet = job.droplet_id;
    match outcome {
        Outcome::Done => store::finish_job(&fleet.db, droplet, fleet.replica).await,
        Outcome::Retry(why) => {
            let delay = RETRY.delay(u32::try_from(job.attempts).unwrap_or(0)).max(Duration::from_secs(1));
            tracing::warn!(droplet_id = %droplet, kind = %job.kind, %why, ?delay, "provisioning step failed; retrying");
            let shown = format!("{}: {why}; retrying", if job.kind == "delete" { "destroying" } else { "creating" });
            store::retry_job(&fleet.db, droplet, &why, delay, &shown).await
        }
        Outcome::Failed(why) => {
            tracing::warn!(droplet_id = %droplet, %why, "provisioning failed; cleaning up");
            store::fail_create_job(&fleet.db, droplet, &why).await
        }
    }
}

fn provider_outcome(what: &str, error: ProviderError) -> Outcome {
    if error.is_retryable() {
        Outcome::Retry(format!("{what}: {error}"))
    } else {
        Outcome::Failed(format!("{what}: {error}"))
    }
}

async fn step(fleet: &Fleet, job: &store::Job) -> sqlx::Result<Outcome> {
    let Some(row) = store::get_droplet(&fleet.db, job.droplet_id).await? else { return Ok(Outcome::Done) };
    let Some(provider) = fleet.providers.get(&row.provider).cloned() else {
        return Ok(match row.provider.as_str() {
            // Nothing was made by a provider: deleting is deleting the row.
            "byo" if job.kind == "delete" => {
                store::delete_droplet(&fleet.db, row.id).await?;
                Outcome::Done
            }
            other => Outcome::Retry(format!("the provider {other:?} is not configured on this control plane")),
        });
    };
    if job.kind == "delete" {
        return destroy(fleet, provider.as_ref(), &row).await;
    }
    create(fleet, provider.as_ref(), &row, job).await
}

async fn destroy(fleet: &Fleet, provider: &dyn Provider, row: &store::DropletRow) -> sqlx::Result<Outcome> {
    let droplet = DropletId::from_uuid(row.id);
    let mut machines = match provider.find(droplet).await {
        Ok(found) => found,
        Err(error) => return Ok(provider_outcome("finding its machines", error).retry_always()),
    };
    if let Some(id) = row.cloud_id.clone().map(CloudId)
        && !machines.contains(&id)
    {
        machines.push(id);
    }
    for machine in machines {
        if let Err(error) = provider.delete(&machine).await {
            return Ok(provider_outcome(&format!("destroying {machine}"), error).retry_always());
        }
        tracing::info!(droplet_id = %droplet, cloud_id = %machine, "destroyed a droplet's machine");
    }
    if row.status == "deleting" {
        store::delete_droplet(&fleet.db, row.id).await?;
    } else {
        store::set_cloud_id(&fleet.db, row.id, None).await?;
    }
    Ok(Outcome::Done)
}

impl Outcome {
    /// Destroying is never given up on: a machine left behind costs money.
    fn retry_always(self) -> Self {
        match self {
            Outcome::Failed(why) => Outcome::Retry(why),
            other => other,
        }
    }
}

async fn create(
    fleet: &Fleet,
    provider: &dyn Provider,
    row: &store::DropletRow,
    job: &store::Job,
) -> sqlx::Result<Outcome> {
    let droplet = DropletId::from_uuid(row.id);
    match row.status.as_str() {
        "provisioning" => {}
        // Connected, or deleted meanwhile: nothing more to do here.
        _ => return Ok(Outcome::Done),
    }
    let deadline = job.deadline.unwrap_or_else(Utc::now);
    if Utc::now() >= deadline {
        return Ok(Outcome::Failed("the droplet's agent did not connect before the provisioning deadline".into()));
    }
    let cloud_id = match row.cloud_id.clone() {
        Some(id) => CloudId(id),
        None => {
            let found = match provider.find(droplet).await {
                Ok(found) => found,
                Err(error) => return Ok(provider_outcome("looking for an earlier machine", error)),
            };
            let id = match found.into_iter().next() {
                Some(id) => id,
                None => match make(fleet, provider, row, deadline).await? {
                    Ok(id) => id,
                    Err(outcome) => return Ok(outcome),
                },
            };
            store::set_cloud_id(&fleet.db, row.id, Some(&id.0)).await?;
            id
        }
    };
    let addresses = match provider.wait_active(&cloud_id).await {
        Ok(addresses) => addresses,
        Err(error) => return Ok(provider_outcome("waiting for the machine", error)),
    };
    let ip = |a: Option<std::net::Ipv4Addr>| a.map(|a| a.to_string()).unwrap_or_default();
    store::set_addresses(&fleet.db, row.id, &ip(addresses.public_ipv4), &ip(addresses.private_ipv4)).await?;
    // The agent enrolls and connects; its `Hello` makes the droplet `online`.
    loop {
        let status = store::droplet_status(&fleet.db, row.id).await?;
        match status.as_deref() {
            Some("provisioning") => {}
            Some("online") => {
                store::clear_status_message(&fleet.db, row.id).await?;
                tracing::info!(droplet_id = %droplet, "provisioned droplet is online");
                return Ok(Outcome::Done);
            }
            _ => return Ok(Outcome::Done),
        }
        if Utc::now() >= deadline {
            return Ok(Outcome::Failed("the droplet's agent did not connect before the provisioning deadline".into()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Makes the machine, with a fresh one-time token in its settings.
async fn make(
    fleet: &Fleet,
    provider: &dyn Provider,
    row: &store::DropletRow,
    deadline: DateTime<Utc>,
) -> sqlx::Result<Result<CloudId, Outcome>> {
    let droplet = DropletId::from_uuid(row.id);
    let ca = &fleet.authorities.active;
    let ttl = (deadline - Utc::now()).to_std().unwrap_or_default().clamp(Duration::from_secs(60), enrollment::MAX_TTL);
    let token = match enrollment::create(&fleet.db, ca, &row.account, Some(droplet), "provisioning", ttl).await {
        Ok(created) => created.token,
        Err(enrollment::CreateError::Store(store::TokenCreateError::Database(error))) => return Err(error),
        Err(error) => return Ok(Err(Outcome::Failed(format!("making its enrollment token: {error}")))),
    };
    let endpoints = &fleet.endpoints;
    let options = UserDataOptions::new(
        endpoints.agent.clone(),
        endpoints.enroll.clone(),
        token,
        ca.sha256_pin(),
        endpoints.agent_image.clone(),
    );
    let rendered = cloudinit::render(&options).and_then(|user_data| {
        let (agent_image, agent_env) = cloudinit::agent_settings(&options)?;
        Ok((user_data, agent_image, agent_env))
    });
    let (user_data, agent_image, agent_env) = match rendered {
        Ok(rendered) => rendered,
        Err(error) => return Ok(Err(Outcome::Failed(format!("the control plane's droplet settings: {error}")))),
    };
    let spec = CreateSpec {
        droplet,
        account: row.account.clone(),
        name: format!("flotilla-{}", &row.id.simple().to_string()[..12]),
        user_data,
        agent_env,
        agent_image,
    };
    match provider.create(&spec).await {
        Ok(id) => {
            tracing::info!(droplet_id = %droplet, cloud_id = %id, "created a droplet's machine");
            Ok(Ok(id))
        }
        Err(error) => Ok(Err(provider_outcome("creating its machine", error))),
    }
}
/// Where droplets reach the control plane, and the agent image they run.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// `host:port` of the agent port.
    pub agent: String,
    /// `host:port` of the enrollment port.
    pub enroll: String,
    pub agent_image: String,
}
