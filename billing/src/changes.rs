//! The entitlement change feed: rows in `change_events`, a NOTIFY at commit, and one listener per billing
//! replica that wakes the replica's watchers, each of which reads the rows it has not yet sent.
//!
//! Watchers read from the table rather than from the notification payloads, so a lost notification (a
//! dropped listener connection) delays an event by at most the poll interval and never loses it.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::store::{self, ChangeRow};

/// How often the listener re-reads the feed head even without a notification.
const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// How often the listener tries to reconnect while the database is unreachable.
const RELISTEN_INTERVAL: Duration = Duration::from_millis(100);
/// How often a quiet stream sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long feed rows are kept for watchers that reconnect.
const RETENTION: time::Duration = time::Duration::days(7);
/// Rows read per query when catching up.
const PAGE: i64 = 500;

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    Heartbeat(i64),
    Reset(i64),
    Change(ChangeRow),
}

/// A billing replica's view of the change feed head, kept current by a background listener.
#[derive(Clone)]
pub struct ChangeFeed {
    db: PgPool,
    head: watch::Receiver<i64>,
    /// Whether the database is reachable. While it is not, watchers end with an error, so that gateways
    /// know their view may be going stale instead of trusting a stream that can no longer see changes.
    reachable: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
}

impl ChangeFeed {
    /// Starts listening for feed notifications; the listener stops when `shutdown` is cancelled.
    pub async fn start(db: PgPool, shutdown: CancellationToken) -> sqlx::Result<Self> {
        let mut listener = PgListener::connect_with(&db).await?;
        listener.listen(store::CHANGES_CHANNEL).await?;
        let (latest, _) = store::change_feed_bounds(&db).await?;
        let (head_sender, head) = watch::channel(latest);
        tokio::spawn(follow_feed(
            db.clone(),
            listener,
            head_sender,
            shutdown.clone(),
        ));
        Ok(Self {
            db,
            head,
            reachable: None,
            shutdown,
        })
    }

    /// Returns the feed with its watchers ending whenever `database` finds the database unreachable.
    pub fn ending_while_unreachable(self, database: &crate::health::DatabaseHealth) -> Self {
        Self {
            reachable: Some(database.watch()),
            ..self
        }
    }

    /// Starts a watcher that sends feed items after `after_sequence` (0: from now on) into a channel; it
    /// ends when the receiver is dropped, on shutdown, or on a database error (reported as `Err`).
    pub fn watch(&self, after_sequence: i64) -> mpsc::Receiver<sqlx::Result<FeedItem>> {
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(run_watcher(self.clone(), after_sequence, sender));
        receiver
    }
}

async fn follow_feed(
    db: PgPool,
    mut listener: PgListener,
    head: watch::Sender<i64>,
    shutdown: CancellationToken,
) {
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    let advance = |sequence: i64| {
        head.send_if_modified(|current| {
            let newer = sequence > *current;
            if newer {
                *current = sequence;
            }
            newer
        });
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            notification = listener.try_recv() => match notification {
                Ok(Some(notification)) => match notification.payload().parse::<i64>() {
                    Ok(sequence) => advance(sequence),
                    Err(_) => tracing::warn!(payload = notification.payload(), "unexpected change notification"),
                },
                // The connection was lost (and is re-established on the next call): notifications sent
                // meanwhile are gone, so re-read the head.
                Ok(None) => match store::change_feed_bounds(&db).await {
                    Ok((latest, _)) => advance(latest),
                    Err(error) => tracing::warn!(%error, "failed to read the change feed head"),
                },
                Err(error) => {
                    tracing::warn!(%error, "change listener failed; reconnecting");
                    match relisten(&db, &shutdown).await {
                        Some(fresh) => listener = fresh,
                        None => return,
                    }
                    // Notifications sent while the listener was away are gone.
                    match store::change_feed_bounds(&db).await {
                        Ok((latest, _)) => advance(latest),
                        Err(error) => tracing::warn!(%error, "failed to read the change feed head"),
                    }
                }
            },
            _ = poll.tick() => match store::change_feed_bounds(&db).await {
                Ok((latest, _)) => advance(latest),
                Err(error) => tracing::warn!(%error, "failed to read the change feed head"),
            },
            _ = prune.tick() => {
                let before = time::OffsetDateTime::now_utc() - RETENTION;
                if let Err(error) = store::prune_changes(&db, before).await {
                    tracing::warn!(%error, "failed to prune the change feed");
                }
            }
        }
    }
}

/// Opens a new listener every `RELISTEN_INTERVAL` until one listens, so notifications flow again right
/// after the database returns; `None` on shutdown. A new one rather than the failed one: that one keeps a
/// connection the server ended with an error, and reconnects only after I/O errors. Logs one line when it
/// is back, with the number of failed attempts.
async fn relisten(db: &PgPool, shutdown: &CancellationToken) -> Option<PgListener> {
    let started = std::time::Instant::now();
    let mut failed_attempts: u64 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(RELISTEN_INTERVAL) => {}
        }
        let listening = async {
            let mut listener = PgListener::connect_with(db).await?;
            listener.listen(store::CHANGES_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listening.await {
            Ok(listener) => {
                tracing::info!(
                    failed_attempts,
                    down_ms = started.elapsed().as_millis() as u64,
                    "change listener reconnected"
                );
                return Some(listener);
            }
            Err(_) => failed_attempts += 1,
        }
    }
}

async fn run_watcher(
    feed: ChangeFeed,
    after_sequence: i64,
    sender: mpsc::Sender<sqlx::Result<FeedItem>>,
) {
    if let Err(error) = send_feed(&feed, after_sequence, &sender).await {
        let _ = sender.send(Err(error)).await;
    }
}

async fn send_feed(
    feed: &ChangeFeed,
    after_sequence: i64,
    sender: &mpsc::Sender<sqlx::Result<FeedItem>>,
) -> sqlx::Result<()> {
    let mut head = feed.head.clone();
    let mut reachable = feed.reachable.clone();
    let (latest, oldest) = store::change_feed_bounds(&feed.db).await?;
    // Rows (after_sequence, oldest) were pruned when oldest > after_sequence + 1; a cursor beyond the head
    // means the feed was reset under the watcher.
    let resumable = after_sequence <= latest && (oldest == 0 || after_sequence + 1 >= oldest);
    let mut cursor = if after_sequence == 0 || !resumable {
        latest
    } else {
        after_sequence
    };
    let first = if after_sequence == 0 || resumable {
        FeedItem::Heartbeat(cursor)
    } else {
        FeedItem::Reset(cursor)
    };
    if sender.send(Ok(first)).await.is_err() {
        return Ok(());
    }

    loop {
        let rows = store::changes_after(&feed.db, cursor, PAGE).await?;
        let full_page = rows.len() as i64 == PAGE;
        for row in rows {
            cursor = row.sequence;
            if sender.send(Ok(FeedItem::Change(row))).await.is_err() {
                return Ok(());
            }
        }
        if full_page {
            continue;
        }
        tokio::select! {
            () = feed.shutdown.cancelled() => return Ok(()),
            () = sender.closed() => return Ok(()),
            () = database_lost(&mut reachable) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the database is unreachable; changes cannot be followed",
                )));
            }
            changed = async { head.wait_for(|&latest| latest > cursor).await.map(|_| ()) } => {
                if changed.is_err() {
                    return Ok(()); // the listener stopped: billing is shutting down
                }
            }
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {
                if sender.send(Ok(FeedItem::Heartbeat(cursor))).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Completes once `reachable` says the database is unreachable (at once if it is now); never without a
/// receiver, or once the probe has stopped.
async fn database_lost(reachable: &mut Option<watch::Receiver<bool>>) {
    let lost = match reachable {
        Some(receiver) => receiver.wait_for(|up| !*up).await.is_ok(),
        None => false,
    };
    if !lost {
        std::future::pending::<()>().await;
    }
}
