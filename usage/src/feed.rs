//! Follows billing's change feed and applies credit changes (payments, grants, adjustments) to the loaded
//! balances, once per ledger reference. The feed cursor lives in Redis, so a restarted replica resumes
//! where the deployment left off.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Request;
use uuid::Uuid;

use proto::billing::v1::{self as billing_pb, change_event::Change};

use crate::{counters::Counters, grpc::BillingClient};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Applies billing's credit changes to usage's balances.
pub struct FeedFollower {
    counters: Counters,
    billing: BillingClient,
}

impl FeedFollower {
    /// Returns a follower applying changes from `billing` to `counters`.
    pub fn new(counters: Counters, billing: BillingClient) -> Self {
        Self { counters, billing }
    }

    /// Follows the feed until `stop` is cancelled, reconnecting with backoff when the stream ends.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                outcome = self.follow_once() => outcome,
            };
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "billing change feed lost");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn follow_once(&self) -> anyhow::Result<()> {
        let cursor = self.counters.feed_cursor().await?;
        let mut stream = self
            .billing
            .clone()
            .watch_changes(Request::new(billing_pb::WatchChangesRequest {
                after_sequence: cursor,
            }))
            .await?
            .into_inner();
        while let Some(event) = stream.message().await? {
            match event.change {
                Some(Change::CreditsChanged(change)) => {
                    let customer = Uuid::parse_str(&change.customer_id)?;
                    let (applied, balance) = self
                        .counters
                        .grant(
                            customer,
                            &change.reference,
                            change.delta_micros,
                            event.sequence,
                        )
                        .await?;
                    if applied {
                        tracing::info!(customer_id = %customer, delta = change.delta_micros, balance, "credit change applied");
                    }
                }
                Some(Change::Reset(_)) => {
                    tracing::warn!(
                        sequence = event.sequence,
                        "billing's change feed was reset: credit changes made while this deployment was \
                         disconnected for longer than the feed's history are not in loaded balances"
                    );
                }
                Some(Change::Heartbeat(_) | Change::KeyChanged(_) | Change::CustomerChanged(_))
                | None => {}
            }
            if event.sequence > cursor || cursor == 0 {
                self.counters.store_feed_cursor(event.sequence).await?;
            }
        }
        Ok(())
    }
}
