//! Listening for `NOTIFY`: the one loop every listener shares.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification};
use tokio_util::sync::CancellationToken;

/// What a listener heard.
pub enum Heard {
    Notification(PgNotification),
    /// The connection dropped and came back: notifications may have been missed, so
    /// whatever they keep up to date must be read again.
    Lost,
}

/// The next thing `listener` hears; `None` once `stop` is cancelled. Errors are logged
/// and retried after a second.
pub async fn hear(listener: &mut PgListener, stop: &CancellationToken, what: &str) -> Option<Heard> {
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return None,
            received = listener.try_recv() => received,
        };
        match received {
            Ok(Some(notification)) => return Some(Heard::Notification(notification)),
            Ok(None) => {
                tracing::warn!("lost the {what} listener's connection; reading again what it keeps up to date");
                return Some(Heard::Lost);
            }
            Err(error) => {
                tracing::warn!(%error, "the {what} listener failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A listener on `channels`, connected with the pool's settings.
pub async fn listen(db: &sqlx::PgPool, channels: &[&str]) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen_all(channels.iter().copied()).await?;
    Ok(listener)
}
