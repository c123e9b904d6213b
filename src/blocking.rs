//! The async pools' way into the broker: its lifecycle (`creds`, `renew`, `revoke`) talks to PostgreSQL with the
//! blocking `postgres` client, which must not run on a tokio worker thread, so the pools run it on tokio's
//! blocking threads.

use std::sync::Arc;

use crate::error::{Error, ErrorKind};
use crate::shared::Shared;

/// Runs `op` on the broker's state on a thread where blocking is allowed, and waits for it without blocking
/// the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    op: impl FnOnce(&Shared) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || op(&shared))
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("the broker's blocking task did not finish ({e}); the runtime is shutting down?"),
            )
        })?
}

/// The runtime the pool's hooks and background work run on: the caller's. Fails outside a tokio runtime.
pub(crate) fn current_runtime(what: &str) -> Result<tokio::runtime::Handle, Error> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "{what} must be awaited inside a tokio runtime (sqlx and deadpool run on tokio)"
            ),
        )
    })
}

/// Revokes lease `id` of a pool of `role` that could not open (its credential could not log in).
pub(crate) async fn revoke_refused(
    shared: &Arc<Shared>,
    role: &str,
    id: &str,
) -> Result<(), Error> {
    let (role, id) = (role.to_owned(), id.to_owned());
    blocking(shared, move |shared| {
        crate::rotation::revoke(shared, &role, &id, crate::events::RevokeCause::PoolClosed);
        Ok(())
    })
    .await
}
