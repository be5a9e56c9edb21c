//! [`ReplicaStore`] on PostgreSQL: the lease is one row, taken and renewed under the write lock
//! (so a takeover and a fenced write are ordered); notices are LISTEN/NOTIFY on a connection of
//! their own, made again whenever it breaks.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_postgres::AsyncMessage;

use super::StoreTls;

use super::{PostgresStore, optional};
use crate::store::{Fence, HubStore, Lease, Notice, ReplicaStore, StoreError};

/// The channel the change feed's writes notify.
pub(super) const CHANGES: &str = "outpost_changes";
/// The channel of replicas' signals.
const SIGNALS: &str = "outpost_signals";

/// Fails unless the lease is held at `fence`'s epoch now (inside the caller's transaction,
/// after the write lock).
pub(super) async fn check_fence<C: GenericClient>(
    client: &C,
    fence: &Fence,
) -> Result<(), StoreError> {
    let epoch = fence.epoch();
    let held = epoch > 0
        && optional(
            client,
            "SELECT 1 FROM leader_lease WHERE id = 1 AND holder = $1 AND epoch = $2
             AND expires_at > clock_timestamp()",
            &[&fence.holder(), &epoch],
        )
        .await?
        .is_some();
    match held {
        true => Ok(()),
        false => Err(StoreError::Fenced {
            holder: fence.holder().to_owned(),
            epoch,
        }),
    }
}

impl PostgresStore {
    /// This store without a fence: the lease itself is taken and given up through it.
    fn unfenced(&self) -> PostgresStore {
        PostgresStore {
            inner: self.inner.clone(),
            fence: None,
        }
    }
}

impl ReplicaStore for PostgresStore {
    fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as f64;
        self.unfenced().write(async |transaction| {
            let taken = optional(
                transaction,
                "INSERT INTO leader_lease (id, holder, epoch, expires_at)
                 VALUES (1, $1, 1, clock_timestamp() + $2 * interval '1 millisecond')
                 ON CONFLICT (id) DO UPDATE SET
                   epoch = CASE WHEN leader_lease.holder = $1 AND leader_lease.expires_at > clock_timestamp()
                           THEN leader_lease.epoch ELSE leader_lease.epoch + 1 END,
                   holder = $1,
                   expires_at = EXCLUDED.expires_at
                 WHERE leader_lease.holder = $1 OR leader_lease.expires_at <= clock_timestamp()
                 RETURNING epoch",
                &[&holder, &ttl_ms],
            )
            .await?;
            if let Some(row) = taken {
                return Ok(Lease::Held {
                    epoch: row.try_get(0)?,
                });
            }
            let row = super::one(
                transaction,
                "SELECT holder, (EXTRACT(EPOCH FROM expires_at - clock_timestamp()) * 1000)::bigint
                 FROM leader_lease WHERE id = 1",
                &[],
            )
            .await?;
            Ok(Lease::Taken {
                holder: row.try_get(0)?,
                expires_in_ms: row.try_get(1)?,
            })
        })
    }

    fn release_lease(&self, holder: &str) -> Result<(), StoreError> {
        self.unfenced().write(async |transaction| {
            super::execute(
                transaction,
                "UPDATE leader_lease SET expires_at = clock_timestamp() WHERE id = 1 AND holder = $1",
                &[&holder],
            )
            .await?;
            Ok(())
        })
    }

    fn fenced(&self, fence: Arc<Fence>) -> Arc<dyn HubStore> {
        Arc::new(PostgresStore {
            fence: Some(fence),
            ..self.unfenced()
        })
    }

    fn signal(&self, payload: &str) -> Result<(), StoreError> {
        self.read(async |client| {
            super::execute(
                client,
                "SELECT pg_notify($1, $2)::text",
                &[&SIGNALS, &payload],
            )
            .await?;
            Ok(())
        })
    }

    fn notices(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        let sender = self.inner.notices.get_or_init(|| {
            let (sender, _) = tokio::sync::broadcast::channel(4096);
            let (config, tls, target, forward) = (
                self.inner.config.clone(),
                self.inner.tls.clone(),
                self.inner.target.clone(),
                sender.clone(),
            );
            if let Some(runtime) = &self.inner.runtime {
                runtime.spawn(listen(config, tls, target, forward));
            }
            sender
        });
        sender.subscribe()
    }
}

/// Listens on both channels, forwarding what arrives; connects again (backing off to 5 s)
/// whenever the connection breaks, and says so with [`Notice::Reconnected`].
async fn listen(
    config: tokio_postgres::Config,
    tls: StoreTls,
    target: String,
    notices: tokio::sync::broadcast::Sender<Notice>,
) {
    let mut wait = Duration::from_millis(250);
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (forward, mut messages) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(notification))) => {
                                if forward.send(notification).is_err() {
                                    return None;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(error)) => return Some(error),
                            None => return None,
                        }
                    }
                });
                match client
                    .batch_execute(&format!("LISTEN {CHANGES}; LISTEN {SIGNALS}"))
                    .await
                {
                    Ok(()) => {
                        wait = Duration::from_millis(250);
                        let _ = notices.send(Notice::Reconnected);
                        while let Some(notification) = messages.recv().await {
                            let notice = match notification.channel() {
                                CHANGES => Notice::Changes,
                                _ => Notice::Signal(notification.payload().to_owned()),
                            };
                            let _ = notices.send(notice);
                        }
                        let error = driver.await.ok().flatten();
                        tracing::warn!(
                            store = %target,
                            error = error.map(|error| super::db_error(error).to_string()),
                            "store: the connection listening to other replicas broke; connecting again"
                        );
                    }
                    Err(error) => {
                        driver.abort();
                        tracing::warn!(store = %target, error = %super::db_error(error), "store: LISTEN failed; trying again");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(store = %target, error = %super::db_error(error), "store: cannot connect to listen to other replicas; trying again");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
