//! Keeps each customer's credit mirror in Redis in line with billing's ledger. Redis may lose its last
//! writes (AOF `everysec` on a host crash, a failover) while billing has already charged the spending
//! they recorded; the mirror would then hold credits the customer has paid with. A sweep compares every
//! loaded mirror with the ledger less the spending billing has not charged yet, and sets it to that
//! figure (down or up); the reporter asks for a customer at once when billing turns out to have applied
//! outboxes Redis no longer knows of.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};
use uuid::Uuid;

use proto::billing::v1 as billing_pb;

use crate::{
    counters::{Counters, LedgerSnapshot, Reconciled, Reconciliation},
    grpc::{BILLING_DEADLINE, BillingClient},
};

/// Customers one sweep visits at most; the next sweep continues where it stopped, so the load on billing
/// stays bounded however many customers there are.
const CUSTOMERS_PER_SWEEP: usize = 2_000;
/// Keys `SCAN` looks at per step.
const SCAN_COUNT: usize = 500;
/// Attempts per customer when credit changes keep arriving while billing is asked.
const ATTEMPTS: usize = 3;
/// How long a reconciliation waits for the change feed to catch up with billing's snapshot, so a credit
/// change still on its way is not counted as a repair.
const FEED_WAIT: Duration = Duration::from_secs(1);

/// Reconciles credit mirrors with billing's ledger, periodically and on request.
#[derive(Clone)]
pub struct Reconciler {
    counters: Counters,
    billing: BillingClient,
    requested: Arc<Mutex<BTreeSet<Uuid>>>,
    wake: Arc<Notify>,
}

impl Reconciler {
    /// Returns a reconciler of the mirrors in `counters` against `billing`.
    pub fn new(counters: Counters, billing: BillingClient) -> Self {
        Self {
            counters,
            billing,
            requested: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// Asks for `customer`'s mirror to be reconciled soon (Redis was found behind billing).
    pub fn request(&self, customer: Uuid) {
        self.requested
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(customer);
        self.wake.notify_one();
    }

    /// Sweeps once at start and then every `interval`, and reconciles requested customers as they come,
    /// until `stop` is cancelled.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        for direction in ["up", "down"] {
            metrics::counter!("paygate_usage_mirror_repairs_total", "direction" => direction)
                .increment(0);
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cursor = 0;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => cursor = self.sweep(cursor).await,
                () = self.wake.notified() => self.reconcile_requested().await,
            }
        }
    }

    async fn reconcile_requested(&self) {
        let customers = std::mem::take(
            &mut *self
                .requested
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for customer in customers {
            if let Err(error) = self.reconcile(customer).await {
                tracing::warn!(customer_id = %customer, %error, "credit mirror reconciliation failed; the sweep retries");
            }
        }
    }

    /// Visits up to `CUSTOMERS_PER_SWEEP` customers from `cursor` on; returns the cursor to continue from.
    async fn sweep(&self, mut cursor: u64) -> u64 {
        let mut visited = 0;
        let mut failures = 0;
        let mut last_error = None;
        loop {
            let (next, customers) = match self
                .counters
                .scan_customers_with_credits(cursor, SCAN_COUNT)
                .await
            {
                Ok(step) => step,
                Err(error) => {
                    tracing::warn!(%error, "credit mirror sweep could not scan redis");
                    return cursor;
                }
            };
            for customer in &customers {
                if let Err(error) = self.reconcile(*customer).await {
                    failures += 1;
                    last_error = Some(error);
                }
            }
            visited += customers.len();
            cursor = next;
            if cursor == 0 || visited >= CUSTOMERS_PER_SWEEP {
                break;
            }
        }
        // One line per sweep, however many customers failed (billing down fails them all).
        if let Some(error) = last_error {
            tracing::warn!(failures, visited, error = %error, "credit mirror sweep could not reconcile some customers");
        }
        cursor
    }

    /// Compares `customer`'s mirror with billing's ledger and repairs it toward the ledger; `None` when
    /// Redis holds nothing of the customer's credits, billing does not know them, or credit changes kept
    /// arriving (the next sweep tries again).
    pub async fn reconcile(&self, customer: Uuid) -> anyhow::Result<Option<Reconciliation>> {
        for _ in 0..ATTEMPTS {
            let Some(state) = self.counters.mirror_state(customer).await? else {
                return Ok(None);
            };
            let Some(ledger) = self.ledger(customer).await? else {
                return Ok(None);
            };
            if state.loaded {
                self.wait_for_feed(ledger.as_of_sequence).await?;
            }
            let reconciliation = self
                .counters
                .reconcile_credits(customer, state.version, ledger)
                .await?;
            if reconciliation.redis_was_behind {
                tracing::warn!(
                    customer_id = %customer,
                    redis = state.outbox_sequence,
                    billing = ledger.outbox_sequence,
                    "billing applied spending that redis no longer knows of: redis lost writes"
                );
            }
            match reconciliation.reconciled {
                Reconciled::Changed => continue,
                Reconciled::Repaired { before, after } => {
                    tracing::warn!(customer_id = %customer, before, after, delta = after - before, "credit mirror repaired toward billing's ledger");
                    let direction = if after > before { "up" } else { "down" };
                    metrics::counter!("paygate_usage_mirror_repairs_total", "direction" => direction)
                        .increment(1);
                }
                Reconciled::Matched { .. } | Reconciled::NotLoaded => {}
            }
            return Ok(Some(reconciliation));
        }
        Ok(None)
    }

    /// Reads the customer's balance and outbox number from billing in one snapshot; `None` for a customer
    /// billing does not know.
    async fn ledger(&self, customer: Uuid) -> anyhow::Result<Option<LedgerSnapshot>> {
        let mut request = Request::new(billing_pb::GetCreditBalanceRequest {
            customer_id: customer.to_string(),
        });
        request.set_timeout(BILLING_DEADLINE);
        match self.billing.clone().get_credit_balance(request).await {
            Ok(balance) => {
                let balance = balance.into_inner();
                Ok(Some(LedgerSnapshot {
                    balance_micros: balance.balance_micros,
                    as_of_sequence: balance.as_of_sequence,
                    outbox_sequence: balance.outbox_sequence,
                }))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    /// Waits (bounded) until the change feed has applied everything up to `sequence`. Past the bound the
    /// reconciliation goes ahead: the result is still right, a late credit change is then applied by the
    /// repair instead of the feed.
    async fn wait_for_feed(&self, sequence: i64) -> redis::RedisResult<()> {
        let deadline = tokio::time::Instant::now() + FEED_WAIT;
        while self.counters.feed_cursor().await? < sequence
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}
