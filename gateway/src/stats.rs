//! Runtime statistics per customer and UTC hour: counted in memory as requests finish (nothing is added to
//! the request path) and sent to billing as one `ReportStats` per interval. A report that fails is sent
//! again under the same id until billing acknowledges it, and billing applies each id once, so the counts
//! billing keeps are exact. Answers without a customer (401, 404, 431 and framing 400s) are not counted
//! here; the metrics count them.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};

use proto::billing::v1 as billing_pb;

use crate::backends::BillingClient;

/// Upper bounds (ms) of the upstream latency buckets; one more, +Inf, follows. Billing's
/// `UPSTREAM_LATENCY_BUCKETS_MS` is the same list (the contract, `CustomerHourStats`).
const LATENCY_BUCKETS_MS: [f64; 13] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
];
/// How long one report may take.
const REPORT_DEADLINE: Duration = Duration::from_secs(5);

/// What one request contributes, filled in as the decision goes.
#[derive(Debug, Default)]
pub struct RequestRecord {
    /// Known once billing resolved the key.
    pub customer_id: Option<String>,
    pub admitted: bool,
    /// The upstream's status and how long its answer's head took.
    pub upstream: Option<(u16, Duration)>,
    /// Spent, net of a refund.
    pub units: i64,
    pub credits_micros: i64,
}

#[derive(Debug, Default)]
struct Counts {
    admitted: i64,
    upstream_2xx: i64,
    upstream_4xx: i64,
    upstream_5xx: i64,
    upstream_other: i64,
    answered: HashMap<&'static str, i64>,
    units: i64,
    credits_micros: i64,
    latency_sum_us: i64,
    latency_buckets: [i64; LATENCY_BUCKETS_MS.len() + 1],
}

/// The counts of this gateway not yet sent to billing.
#[derive(Default)]
pub struct CustomerStats {
    hours: Mutex<HashMap<(String, i64), Counts>>,
}

impl CustomerStats {
    /// Counts a finished request of a known customer; `code` is its problem code, or `forwarded`.
    pub fn record(&self, customer_id: String, code: &'static str, request: &RequestRecord) {
        let hour = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| since.as_secs() as i64 / 3600 * 3600)
            .unwrap_or(0);
        let mut hours = self
            .hours
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let counts = hours.entry((customer_id, hour)).or_default();
        counts.admitted += i64::from(request.admitted);
        counts.units += request.units;
        counts.credits_micros += request.credits_micros;
        if let Some((status, took)) = request.upstream {
            match status {
                200..=299 => counts.upstream_2xx += 1,
                400..=499 => counts.upstream_4xx += 1,
                500..=599 => counts.upstream_5xx += 1,
                _ => counts.upstream_other += 1,
            }
            let micros = i64::try_from(took.as_micros()).unwrap_or(i64::MAX);
            counts.latency_sum_us = counts.latency_sum_us.saturating_add(micros);
            let millis = took.as_secs_f64() * 1_000.0;
            let bucket = LATENCY_BUCKETS_MS
                .iter()
                .position(|bound| millis <= *bound)
                .unwrap_or(LATENCY_BUCKETS_MS.len());
            counts.latency_buckets[bucket] += 1;
        }
        if code != "forwarded" {
            *counts.answered.entry(code).or_default() += 1;
        }
    }

    fn take(&self) -> Vec<billing_pb::CustomerHourStats> {
        let hours = std::mem::take(
            &mut *self
                .hours
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        hours
            .into_iter()
            .map(
                |((customer_id, hour), counts)| billing_pb::CustomerHourStats {
                    customer_id,
                    hour: Some(prost_types::Timestamp {
                        seconds: hour,
                        nanos: 0,
                    }),
                    admitted: counts.admitted,
                    upstream_2xx: counts.upstream_2xx,
                    upstream_4xx: counts.upstream_4xx,
                    upstream_5xx: counts.upstream_5xx,
                    upstream_other: counts.upstream_other,
                    answered: counts
                        .answered
                        .into_iter()
                        .map(|(code, count)| (code.to_owned(), count))
                        .collect(),
                    units: counts.units,
                    credits_micros: counts.credits_micros,
                    upstream_latency_sum_us: counts.latency_sum_us,
                    upstream_latency_buckets: counts.latency_buckets.to_vec(),
                },
            )
            .collect()
    }

    /// Reports to `billing` every `interval` until `stop` is cancelled, then once more (what is still
    /// unsent when that last report fails is lost, and logged).
    pub async fn report(
        &self,
        billing: BillingClient,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut pending: Option<billing_pb::ReportStatsRequest> = None;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => self.send(&billing, &mut pending).await,
            }
        }
        self.send(&billing, &mut pending).await;
        if pending.is_none() {
            // The counts that came in while an earlier report was being retried.
            self.send(&billing, &mut pending).await;
        }
        if pending.is_some()
            || !self
                .hours
                .lock()
                .map(|hours| hours.is_empty())
                .unwrap_or(true)
        {
            tracing::error!(
                "customer statistics could not reach billing before shutdown; they are lost"
            );
        }
    }

    async fn send(
        &self,
        billing: &BillingClient,
        pending: &mut Option<billing_pb::ReportStatsRequest>,
    ) {
        if pending.is_none() {
            let rows = self.take();
            if rows.is_empty() {
                return;
            }
            *pending = Some(billing_pb::ReportStatsRequest {
                report_id: uuid::Uuid::new_v4().to_string(),
                rows,
            });
        }
        let Some(report) = pending.as_ref() else {
            return;
        };
        let mut request = Request::new(report.clone());
        request.set_timeout(REPORT_DEADLINE);
        match tokio::time::timeout(REPORT_DEADLINE, billing.clone().report_stats(request)).await {
            Ok(Ok(_)) => *pending = None,
            Ok(Err(status)) if matches!(status.code(), Code::InvalidArgument | Code::NotFound) => {
                // Sending it again cannot succeed.
                tracing::error!(code = ?status.code(), message = status.message(), "billing refused customer statistics; dropped");
                *pending = None;
            }
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), "customer statistics not reported; will retry")
            }
            Err(_) => tracing::warn!("customer statistics not reported in time; will retry"),
        }
    }
}
