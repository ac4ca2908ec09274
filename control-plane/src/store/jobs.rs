//! `provisioning_jobs`: durable, leased jobs that make and destroy providers' machines,
//! and the droplet columns those jobs fill in.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{DropletRow, Revoke, revoke_certificates};

#[derive(Debug, sqlx::FromRow)]
pub struct Job {
    pub droplet_id: Uuid,
    pub kind: String,
    pub attempts: i32,
    pub deadline: Option<DateTime<Utc>>,
}

/// A new droplet of `provider`, `provisioning`, with its create job, due within `timeout`.
pub async fn insert_provisioning_droplet(
    db: &PgPool,
    id: Uuid,
    account: &str,
    provider: &str,
    labels: &BTreeMap<String, String>,
    timeout: Duration,
) -> sqlx::Result<DropletRow> {
    let mut tx = db.begin().await?;
    let row: DropletRow = sqlx::query_as(
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

/// Revokes the droplet's certificates (its session closes everywhere) and unused tokens,
/// marks it `deleting` and leaves the job that destroys its machine, in one transaction.
/// Returns the revoked serials.
pub async fn begin_droplet_delete(db: &PgPool, id: Uuid) -> sqlx::Result<Vec<String>> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE droplets SET status = 'deleting', status_message = 'destroying its machine' WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let revoked = revoke_certificates(&mut tx, &Revoke::Droplet(id)).await?;
    revoke_open_tokens(&mut tx, id).await?;
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

/// Revokes the droplet's tokens that were never used.
async fn revoke_open_tokens(conn: &mut PgConnection, droplet: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE enrollment_tokens SET revoked_at = now()
         WHERE droplet_id = $1 AND used_at IS NULL AND revoked_at IS NULL",
    )
    .bind(droplet)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the most overdue job nobody holds, under a lease of `lease` for `replica`.
pub async fn claim_job(db: &PgPool, replica: Uuid, lease: Duration) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(
        "UPDATE provisioning_jobs SET owner = $1, lease_until = now() + $2, attempts = attempts + 1
         WHERE droplet_id = (
             SELECT droplet_id FROM provisioning_jobs
             WHERE not_before <= now() AND (lease_until IS NULL OR lease_until < now())
             ORDER BY not_before LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING droplet_id, kind, attempts, deadline",
    )
    .bind(replica)
    .bind(lease)
    .fetch_optional(db)
    .await
}

/// Extends `replica`'s lease on a droplet's job.
pub async fn renew_lease(db: &PgPool, droplet: Uuid, replica: Uuid, lease: Duration) -> sqlx::Result<()> {
    sqlx::query("UPDATE provisioning_jobs SET lease_until = now() + $3 WHERE droplet_id = $1 AND owner = $2")
        .bind(droplet)
        .bind(replica)
        .bind(lease)
        .execute(db)
        .await?;
    Ok(())
}

/// The job is done: it goes, if `replica` still holds it.
pub async fn finish_job(db: &PgPool, droplet: Uuid, replica: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM provisioning_jobs WHERE droplet_id = $1 AND owner = $2")
        .bind(droplet)
        .bind(replica)
        .execute(db)
        .await?;
    Ok(())
}

/// The job is tried again after `delay`; the droplet shows `shown` meanwhile.
pub async fn retry_job(db: &PgPool, droplet: Uuid, why: &str, delay: Duration, shown: &str) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "UPDATE provisioning_jobs SET owner = NULL, lease_until = NULL, last_error = $2,
             not_before = now() + $3 WHERE droplet_id = $1",
    )
    .bind(droplet)
    .bind(why)
    .bind(delay)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE droplets SET status_message = $2 WHERE id = $1")
        .bind(droplet)
        .bind(shown)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Creating failed for good: the droplet is `error` with `why`, its unused tokens are
/// revoked, and the job becomes the delete job that destroys what was made (the row
/// stays, visible as `error`, until an operator deletes it).
pub async fn fail_create_job(db: &PgPool, droplet: Uuid, why: &str) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE droplets SET status = 'error', status_message = $2 WHERE id = $1 AND status = 'provisioning'")
        .bind(droplet)
        .bind(why)
        .execute(&mut *tx)
        .await?;
    revoke_open_tokens(&mut tx, droplet).await?;
    sqlx::query(
        "UPDATE provisioning_jobs SET kind = 'delete', owner = NULL, lease_until = NULL, attempts = 0,
             not_before = now(), last_error = $2, deadline = NULL WHERE droplet_id = $1",
    )
    .bind(droplet)
    .bind(why)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Records the provider's id of a droplet's machine (`None`: it was destroyed).
pub async fn set_cloud_id(db: &PgPool, droplet: Uuid, cloud_id: Option<&str>) -> sqlx::Result<()> {
    let query = match cloud_id {
        Some(_) => "UPDATE droplets SET cloud_id = $2, status_message = 'booting' WHERE id = $1",
        None => "UPDATE droplets SET cloud_id = $2 WHERE id = $1",
    };
    sqlx::query(query).bind(droplet).bind(cloud_id).execute(db).await?;
    Ok(())
}

/// Records a provisioning droplet's addresses; it waits for its agent now.
pub async fn set_addresses(db: &PgPool, droplet: Uuid, public_ipv4: &str, private_ipv4: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE droplets SET public_ipv4 = $2, private_ipv4 = $3, status_message = 'waiting for its agent'
         WHERE id = $1 AND status = 'provisioning'",
    )
    .bind(droplet)
    .bind(public_ipv4)
    .bind(private_ipv4)
    .execute(db)
    .await?;
    Ok(())
}

/// A droplet's status, as stored; `None` if there is no such droplet.
pub async fn droplet_status(db: &PgPool, droplet: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT status FROM droplets WHERE id = $1").bind(droplet).fetch_optional(db).await
}

/// Clears what a droplet's status message said.
pub async fn clear_status_message(db: &PgPool, droplet: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE droplets SET status_message = '' WHERE id = $1").bind(droplet).execute(db).await?;
    Ok(())
}

/// The provider a droplet was made with; `None` if there is no such droplet.
pub async fn droplet_provider(db: &PgPool, droplet: Uuid) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT provider FROM droplets WHERE id = $1").bind(droplet).fetch_optional(db).await
}
