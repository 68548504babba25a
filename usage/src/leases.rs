//! Lease recalls across usage replicas, and the sweep that writes off leases nobody returned.
//!
//! Recalls travel over Redis pub/sub (`P:recall`, `P:returned`, see `counters`), so an admission on one
//! replica reaches a holder whose `WatchRecalls` stream another replica serves, and learns there of the
//! return.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use std::future::Future;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::counters::{Counters, WriteOff};

/// How often the sweep looks for leases due to be written off.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Leases one sweep step writes off at most; the next step continues.
const SWEEP_BATCH: usize = 500;
/// Recalls queued for one holder's stream; a holder that does not read them loses the newest.
const RECALLS_QUEUED: usize = 1024;
/// How long the subscriber waits before connecting again after Redis dropped it.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(250);

/// Routes recalls to the holders watching this replica and return notices to admissions waiting here.
#[derive(Clone, Default)]
pub struct RecallBroker {
    watchers: Arc<Mutex<HashMap<Uuid, mpsc::Sender<Uuid>>>>,
    returned: Arc<ReturnedNotices>,
    closing: CancellationToken,
    subscribed: Arc<tokio::sync::watch::Sender<bool>>,
}

struct ReturnedNotices(broadcast::Sender<Uuid>);

impl Default for ReturnedNotices {
    fn default() -> Self {
        Self(broadcast::channel(1024).0)
    }
}

impl RecallBroker {
    /// Registers `holder`'s stream; a stream it opened before is replaced (its recalls come here now).
    /// Returns the receiver of the customers recalled from it.
    pub fn watch(&self, holder: Uuid) -> mpsc::Receiver<Uuid> {
        let (sender, receiver) = mpsc::channel(RECALLS_QUEUED);
        self.lock_watchers().insert(holder, sender);
        receiver
    }

    /// Returns the stream of customers recalled from `holder`; a stream it opened before is replaced. It
    /// ends when the broker closes.
    pub fn recalls(&self, holder: Uuid) -> RecallStream {
        RecallStream {
            receiver: Some(self.watch(holder)),
            broker: self.clone(),
            holder,
            closing: Box::pin(self.closing.clone().cancelled_owned()),
        }
    }

    /// Waits until the broker follows the channels, at most `limit`; returns whether it does.
    pub async fn wait_until_subscribed(&self, limit: Duration) -> bool {
        let mut subscribed = self.subscribed.subscribe();
        tokio::time::timeout(limit, subscribed.wait_for(|subscribed| *subscribed))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    /// Ends every recall stream (shutdown: the server waits for open streams before it stops).
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Forgets `holder`'s stream if it is still the one registered (a newer one stays).
    pub fn unwatch(&self, holder: Uuid) {
        let mut watchers = self.lock_watchers();
        if watchers.get(&holder).is_some_and(mpsc::Sender::is_closed) {
            watchers.remove(&holder);
        }
    }

    /// Returns a receiver of the customers whose leases are returned or written off from now on.
    pub fn returns(&self) -> broadcast::Receiver<Uuid> {
        self.returned.0.subscribe()
    }

    fn lock_watchers(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, mpsc::Sender<Uuid>>> {
        self.watchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn deliver_recall(&self, message: &str) {
        let mut words = message.split(' ');
        let Some(customer) = words.next().and_then(|word| Uuid::parse_str(word).ok()) else {
            return;
        };
        let watchers = self.lock_watchers();
        for holder in words.filter_map(|word| Uuid::parse_str(word).ok()) {
            if let Some(stream) = watchers.get(&holder) {
                let _ = stream.try_send(customer);
            }
        }
    }

    fn deliver_returned(&self, message: &str) {
        if let Ok(customer) = Uuid::parse_str(message) {
            let _ = self.returned.0.send(customer);
        }
    }

    /// Follows `P:recall` and `P:returned` on a connection of its own through `client` until `stop` is
    /// cancelled, subscribing again whenever Redis drops it (recalls sent meanwhile are lost: admissions
    /// waiting on them give up after their bounded wait).
    pub async fn run(
        self,
        client: redis::Client,
        recall_channel: String,
        returned_channel: String,
        stop: CancellationToken,
    ) {
        loop {
            let followed = tokio::select! {
                () = stop.cancelled() => return,
                followed = self.follow(&client, &recall_channel, &returned_channel) => followed,
            };
            self.subscribed.send_replace(false);
            if let Err(error) = followed {
                tracing::warn!(%error, "lease recall subscription lost; subscribing again");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
        }
    }

    async fn follow(
        &self,
        client: &redis::Client,
        recall_channel: &str,
        returned_channel: &str,
    ) -> redis::RedisResult<()> {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(recall_channel).await?;
        pubsub.subscribe(returned_channel).await?;
        self.subscribed.send_replace(true);
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            if message.get_channel_name() == recall_channel {
                self.deliver_recall(&payload);
            } else {
                self.deliver_returned(&payload);
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "subscription closed",
        )))
    }
}

/// The customers recalled from one holder; ending it (the holder hung up) unregisters it.
pub struct RecallStream {
    receiver: Option<mpsc::Receiver<Uuid>>,
    broker: RecallBroker,
    holder: Uuid,
    closing: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl tokio_stream::Stream for RecallStream {
    type Item = Uuid;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Uuid>> {
        if self.closing.as_mut().poll(context).is_ready() {
            return std::task::Poll::Ready(None);
        }
        match self.receiver.as_mut() {
            Some(receiver) => receiver.poll_recv(context),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for RecallStream {
    fn drop(&mut self) {
        // Closed first, so `unwatch` can tell this stream from a newer one of the same holder.
        self.receiver.take();
        self.broker.unwatch(self.holder);
    }
}

/// Writes off every lease whose deadline and grace passed, every `SWEEP_INTERVAL` until `stop` is
/// cancelled (every replica sweeps; the script writes each lease off once).
pub async fn sweep(counters: Counters, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(error) = sweep_once(&counters).await {
                    tracing::warn!(%error, "lease sweep failed");
                }
            }
        }
    }
}

/// Writes off the leases due now; returns how many it wrote off.
pub async fn sweep_once(counters: &Counters) -> redis::RedisResult<usize> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        });
    let mut written_off = 0;
    for (customer, lease) in counters.leases_due(now_ms, SWEEP_BATCH).await? {
        if counters.write_off_lease(customer, lease).await? == WriteOff::WrittenOff {
            tracing::warn!(customer_id = %customer, lease_id = %lease, "lease written off: not returned by its deadline");
            count_written_off(1);
            written_off += 1;
        }
    }
    Ok(written_off)
}

/// Counts leases written off in `paygate_usage_leases_written_off_total`.
pub fn count_written_off(leases: u64) {
    metrics::counter!("paygate_usage_leases_written_off_total").increment(leases);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recall_reaches_only_the_named_holders_watching_here() {
        let broker = RecallBroker::default();
        let (named, other) = (Uuid::new_v4(), Uuid::new_v4());
        let customer = Uuid::new_v4();
        let mut named_stream = broker.watch(named);
        let mut other_stream = broker.watch(other);

        broker.deliver_recall(&format!("{customer} {named} {}", Uuid::new_v4()));

        assert_eq!(named_stream.try_recv().ok(), Some(customer));
        assert!(other_stream.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_replaced_stream_stays_registered_when_the_old_one_ends() {
        let broker = RecallBroker::default();
        let holder = Uuid::new_v4();
        let customer = Uuid::new_v4();
        let old = broker.watch(holder);
        let mut new = broker.watch(holder);
        drop(old);

        broker.unwatch(holder);
        broker.deliver_recall(&format!("{customer} {holder}"));

        assert_eq!(new.try_recv().ok(), Some(customer));
    }
}
