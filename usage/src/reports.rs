//! Ships spending to billing: seals each spender's outbox, sends the sealed entries in one report, and
//! drops them once billing acknowledges. Billing applies every entry once by its id, so a report that
//! failed (or whose answer was lost) is simply sent again, in any grouping, under a new report id.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Request;
use uuid::Uuid;

use proto::billing::v1 as billing_pb;

use crate::{
    counters::Counters,
    grpc::{BillingClient, DirtyCustomers, period_start_timestamp},
    reconcile::Reconciler,
};

/// How often the reporter sweeps Redis for outboxes nobody noted (left by a replica that stopped).
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Customers per report; billing takes at most 10,000 entries.
const CUSTOMERS_PER_REPORT: usize = 500;
/// How long the final flush at shutdown may take.
const FINAL_FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// Reports spending to billing in the background.
#[derive(Clone)]
pub struct Reporter {
    counters: Counters,
    billing: BillingClient,
    dirty: DirtyCustomers,
    reconciler: Reconciler,
}

impl Reporter {
    /// Returns a reporter of the spending `dirty` notes, from `counters` to `billing`; customers whose
    /// Redis turns out to be behind billing go to `reconciler`.
    pub fn new(
        counters: Counters,
        billing: BillingClient,
        dirty: DirtyCustomers,
        reconciler: Reconciler,
    ) -> Self {
        Self {
            counters,
            billing,
            dirty,
            reconciler,
        }
    }

    /// Reports every `interval` until `stop` is cancelled, then reports everything pending once more.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut last_reported = std::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = sweep.tick() => self.sweep().await,
                _ = tick.tick() => {
                    match self.report_pending().await {
                        Ok(_) => last_reported = std::time::Instant::now(),
                        Err(error) => tracing::warn!(%error, "usage report failed; will retry"),
                    }
                    // How long spending may have waited for billing: 0 right after a report went through,
                    // growing while reports fail.
                    metrics::gauge!("paygate_usage_report_lag_seconds")
                        .set(last_reported.elapsed().as_secs_f64());
                }
            }
        }
        let flush = async {
            self.sweep().await;
            self.report_pending().await
        };
        match tokio::time::timeout(FINAL_FLUSH_LIMIT, flush).await {
            Ok(Ok(customers)) => tracing::info!(customers, "final usage report sent"),
            Ok(Err(error)) => {
                tracing::error!(%error, "final usage report failed; Redis keeps it for the next start")
            }
            Err(_) => {
                tracing::error!("final usage report timed out; Redis keeps it for the next start")
            }
        }
    }

    async fn sweep(&self) {
        match self.counters.customers_with_outboxes().await {
            Ok(customers) => self.dirty.mark_all(customers),
            Err(error) => tracing::warn!(%error, "outbox sweep failed"),
        }
    }

    /// Sends everything noted as pending; returns how many customers' spending billing acknowledged. On
    /// failure the customers stay pending.
    pub async fn report_pending(&self) -> anyhow::Result<usize> {
        let customers = self.dirty.take();
        let mut acknowledged = 0;
        for (index, chunk) in customers.chunks(CUSTOMERS_PER_REPORT).enumerate() {
            if let Err(error) = self.report(chunk).await {
                self.dirty
                    .mark_all(customers[index * CUSTOMERS_PER_REPORT..].iter().copied());
                return Err(error);
            }
            acknowledged += chunk.len();
        }
        Ok(acknowledged)
    }

    async fn report(&self, customers: &[Uuid]) -> anyhow::Result<()> {
        let mut sealed = Vec::with_capacity(customers.len());
        let mut entries = Vec::new();
        for &customer in customers {
            let Some(outbox) = self.counters.seal(customer).await? else {
                continue;
            };
            entries.extend(outbox.spend.iter().map(|spend| billing_pb::UsageEntry {
                entry_id: format!(
                    "{}:{}:{}",
                    outbox.id, spend.subscription, spend.period_start_ms
                ),
                customer_id: customer.to_string(),
                subscription_id: spend.subscription.to_string(),
                period_start: Some(period_start_timestamp(spend.period_start_ms)),
                units: spend.units,
                credits_micros: spend.credits_micros,
                outbox_sequence: outbox.sequence,
            }));
            sealed.push((customer, outbox.id, outbox.sequence));
        }
        let mut billed = std::collections::HashMap::new();
        if !entries.is_empty() {
            let report_id = Uuid::new_v4().to_string();
            let mut request = Request::new(billing_pb::ReportUsageRequest {
                report_id: report_id.clone(),
                entries,
            });
            request.set_timeout(Duration::from_secs(10));
            let answer = self
                .billing
                .clone()
                .report_usage(request)
                .await?
                .into_inner();
            tracing::debug!(%report_id, applied = answer.applied_entries, "usage reported");
            billed = answer.outbox_sequences;
        }
        for (customer, id, sequence) in sealed {
            let billed = billed.get(&customer.to_string()).copied().unwrap_or(0);
            if self.counters.acknowledge(customer, &id, billed).await? {
                // Billing had applied this outbox's number before: Redis lost the seal (and maybe the
                // spending and acknowledgements around it). What this outbox holds is not charged, in
                // the customer's favour; the mirror is reloaded from the ledger.
                tracing::warn!(customer_id = %customer, outbox = sequence, billed, "redis lost writes: outbox already applied by billing; reconciling the credit mirror");
                self.reconciler.request(customer);
            }
        }
        Ok(())
    }
}
