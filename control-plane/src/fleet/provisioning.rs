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

#[derive(Debug, sqlx::FromRow)]
struct Job {
    droplet_id: Uuid,
    kind: String,
    attempts: i32,
    deadline: Option<DateTime<Utc>>,
}

/// A new droplet of `provider`, `provisioning`, with its create job. Returns the row.
pub async fn begin_create(
    db: &PgPool,
    account: &str,
    provider: &str,
    labels: &std::collections::BTreeMap<String, String>,
    timeout: Duration,
) -> sqlx::Result<store::DropletRow> {
    let id = DropletId::new().as_uuid();
    let mut tx = db.begin().await?;
    let row: store::DropletRow = sqlx::query_as(
        "INSERT INTO droplets (id, account, status, provider, labels) VALUES ($1, $2, 'provisioning', $3, $4)
         RETURNING *",
    )
    .bind(id)
    .bind(account)
    .bind(provider)
    .bind(sqlx::types::Json(labels))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO provisioning_jobs (droplet_id, kind, deadline) VALUES ($1, 'create', now() + $2)")
        .bind(id)
        .bind(timeout)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(row)
}

/// Revokes the droplet's certificates (its session closes everywhere), marks it
/// `deleting` and leaves the job that destroys its machine. Returns the revoked serials.
pub async fn begin_delete(db: &PgPool, id: Uuid) -> sqlx::Result<Vec<String>> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE droplets SET status = 'deleting', status_message = 'destroying its machine' WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let revoked = store::revoke_certificates(&mut tx, &store::Revoke::Droplet(id)).await?;
    revoke_tokens(&mut tx, id).await?;
    sqlx::query(
        "INSERT INTO provisioning_jobs (droplet_id, kind) VALUES ($1, 'delete')
         ON CONFLICT (droplet_id) DO UPDATE SET kind = 'delete', attempts = 0, not_before = now(),
             owner = NULL, lease_until = NULL, last_error = '', deadline = NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(revoked.into_iter().map(|(serial, _)| serial).collect())
}

async fn revoke_tokens(conn: &mut sqlx::PgConnection, droplet: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE enrollment_tokens SET revoked_at = now()
         WHERE droplet_id = $1 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(droplet)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes due jobs and works them until `stop`.
pub fn spawn(fleet: &Fleet, stop: &CancellationToken, tasks: &mut JoinSet<()>) {
    let (fleet, stop) = (fleet.clone(), stop.clone());
    tasks.spawn(async move {
        let mut running = JoinSet::new();
        loop {
            match claim(&fleet.db, fleet.replica).await {
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

async fn claim(db: &PgPool, replica: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(
        "UPDATE provisioning_jobs SET owner = $1, lease_until = now() + $2, attempts = attempts + 1
         WHERE droplet_id = (
             SELECT droplet_id FROM provisioning_jobs
             WHERE not_before <= now() AND (lease_until IS NULL OR lease_until < now())
             ORDER BY not_before LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING droplet_id, kind, attempts, deadline",
    )
    .bind(replica)
    .bind(LEASE)
    .fetch_optional(db)
    .await
}

/// What a step ended with.
enum Outcome {
    Done,
    /// Try again after a back-off; the error is shown on the droplet meanwhile.
    Retry(String),
    /// Give up: the droplet is `error` with this reason, and what was made is removed.
    Failed(String),
}

async fn work(fleet: &Fleet, job: Job, stop: &CancellationToken) {
    let droplet = job.droplet_id;
    // Keeps the lease while the step runs.
    let renew = {
        let (db, replica) = (fleet.db.clone(), fleet.replica);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                let renewed = sqlx::query(
                    "UPDATE provisioning_jobs SET lease_until = now() + $3 WHERE droplet_id = $1 AND owner = $2",
                )
                .bind(droplet)
                .bind(replica)
                .bind(LEASE)
                .execute(&db)
                .await;
                if let Err(error) = renewed {
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

async fn record(fleet: &Fleet, job: &Job, outcome: Outcome) -> sqlx::Result<()> {
    let droplet = job.droplet_id;
    match outcome {
        Outcome::Done => {
            sqlx::query("DELETE FROM provisioning_jobs WHERE droplet_id = $1 AND owner = $2")
                .bind(droplet)
                .bind(fleet.replica)
                .execute(&fleet.db)
                .await?;
        }
        Outcome::Retry(why) => {
            let delay = RETRY.delay(u32::try_from(job.attempts).unwrap_or(0)).max(Duration::from_secs(1));
            tracing::warn!(droplet_id = %droplet, kind = %job.kind, %why, ?delay, "provisioning step failed; retrying");
            let mut tx = fleet.db.begin().await?;
            sqlx::query(
                "UPDATE provisioning_jobs SET owner = NULL, lease_until = NULL, last_error = $2,
                     not_before = now() + $3 WHERE droplet_id = $1",
            )
            .bind(droplet)
            .bind(&why)
            .bind(delay)
            .execute(&mut *tx)
            .await?;
            let shown = format!("{}: {why}; retrying", if job.kind == "delete" { "destroying" } else { "creating" });
            sqlx::query("UPDATE droplets SET status_message = $2 WHERE id = $1")
                .bind(droplet)
                .bind(shown)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Outcome::Failed(why) => {
            tracing::warn!(droplet_id = %droplet, %why, "provisioning failed; cleaning up");
            let mut tx = fleet.db.begin().await?;
            sqlx::query(
                "UPDATE droplets SET status = 'error', status_message = $2 WHERE id = $1 AND status = 'provisioning'",
            )
            .bind(droplet)
            .bind(&why)
            .execute(&mut *tx)
            .await?;
            revoke_tokens(&mut tx, droplet).await?;
            // What was made is destroyed by a delete job, which leaves the row: the droplet
            // stays visible as `error` until an operator deletes it.
            sqlx::query(
                "UPDATE provisioning_jobs SET kind = 'delete', owner = NULL, lease_until = NULL, attempts = 0,
                     not_before = now(), last_error = $2, deadline = NULL WHERE droplet_id = $1",
            )
            .bind(droplet)
            .bind(&why)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

fn provider_outcome(what: &str, error: ProviderError) -> Outcome {
    if error.is_retryable() {
        Outcome::Retry(format!("{what}: {error}"))
    } else {
        Outcome::Failed(format!("{what}: {error}"))
    }
}

async fn step(fleet: &Fleet, job: &Job) -> sqlx::Result<Outcome> {
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
        sqlx::query("UPDATE droplets SET cloud_id = NULL WHERE id = $1").bind(row.id).execute(&fleet.db).await?;
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

async fn create(fleet: &Fleet, provider: &dyn Provider, row: &store::DropletRow, job: &Job) -> sqlx::Result<Outcome> {
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
            sqlx::query("UPDATE droplets SET cloud_id = $2, status_message = 'booting' WHERE id = $1")
                .bind(row.id)
                .bind(&id.0)
                .execute(&fleet.db)
                .await?;
            id
        }
    };
    let addresses = match provider.wait_active(&cloud_id).await {
        Ok(addresses) => addresses,
        Err(error) => return Ok(provider_outcome("waiting for the machine", error)),
    };
    let ip = |a: Option<std::net::Ipv4Addr>| a.map(|a| a.to_string()).unwrap_or_default();
    sqlx::query(
        "UPDATE droplets SET public_ipv4 = $2, private_ipv4 = $3, status_message = 'waiting for its agent'
         WHERE id = $1 AND status = 'provisioning'",
    )
    .bind(row.id)
    .bind(ip(addresses.public_ipv4))
    .bind(ip(addresses.private_ipv4))
    .execute(&fleet.db)
    .await?;
    // The agent enrolls and connects; its `Hello` makes the droplet `online`.
    loop {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM droplets WHERE id = $1")
            .bind(row.id)
            .fetch_optional(&fleet.db)
            .await?;
        match status.as_deref() {
            Some("provisioning") => {}
            Some("online") => {
                sqlx::query("UPDATE droplets SET status_message = '' WHERE id = $1")
                    .bind(row.id)
                    .execute(&fleet.db)
                    .await?;
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
