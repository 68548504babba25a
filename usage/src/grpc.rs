//! The transport adapter: `usage.v1.Usage` requests in, validation, counters, proto answers out.

use std::{
    collections::{BTreeSet, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost_types::Timestamp;
use tokio_stream::StreamExt;
use tonic::{
    Request, Response, Status, service::interceptor::InterceptedService, transport::Channel,
};
use uuid::Uuid;

use proto::{
    auth::BearerToken,
    billing::v1::{self as billing_pb, entitlements_client::EntitlementsClient},
    usage::v1 as pb,
};

use crate::{
    counters::{
        Admission, Counters, Decision, LeaseAsk, LeaseGrant, LeaseOutcome, LeaseReturn, Overage,
        Verdict,
    },
    error::UsageError,
    leases::{RecallBroker, count_written_off},
};

/// A client of billing's internal API, carrying the service token.
pub type BillingClient = EntitlementsClient<InterceptedService<Channel, BearerToken>>;

/// How long usage waits for billing on the request path (a credit load).
pub const BILLING_DEADLINE: Duration = Duration::from_secs(2);
const MAX_BATCH: usize = 1_000;
/// Credit loads of customers in one stripe wait for each other (then find the balance loaded).
const LOAD_STRIPES: usize = 64;

/// Customers whose outbox has spending that billing has not yet been sent.
#[derive(Clone, Default)]
pub struct DirtyCustomers(Arc<Mutex<HashSet<Uuid>>>);

impl DirtyCustomers {
    /// Notes that `customer` has spending to report.
    pub fn mark(&self, customer: Uuid) {
        let mut dirty = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if dirty.insert(customer) {
            count_outbox_customers(dirty.len());
        }
    }

    /// Notes several customers at once.
    pub fn mark_all(&self, customers: impl IntoIterator<Item = Uuid>) {
        let mut dirty = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        dirty.extend(customers);
        count_outbox_customers(dirty.len());
    }

    /// Takes every noted customer, leaving none.
    pub fn take(&self) -> Vec<Uuid> {
        let taken = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        count_outbox_customers(0);
        taken.into_iter().collect()
    }
}

/// Customers with spending noted and not yet taken for a report.
fn count_outbox_customers(customers: usize) {
    metrics::gauge!("paygate_usage_outbox_customers").set(customers as f64);
}

/// Counts one decision as `paygate_usage_admissions_total{outcome}`.
fn count_admission(outcome: Result<Verdict, ()>) {
    let outcome = match outcome {
        Ok(Verdict::Admitted) => "admitted",
        Ok(Verdict::RateLimited) => "rate_limited",
        Ok(Verdict::QuotaExhausted) => "quota_exhausted",
        Ok(Verdict::CreditsExhausted) => "credits_exhausted",
        Ok(Verdict::CreditsNotLoaded | Verdict::HeldElsewhere) | Err(()) => "error",
    };
    metrics::counter!("paygate_usage_admissions_total", "outcome" => outcome).increment(1);
}

/// Serves `usage.v1.Usage`.
#[derive(Clone)]
pub struct UsageApi {
    counters: Counters,
    billing: BillingClient,
    dirty: DirtyCustomers,
    loading: Arc<[tokio::sync::Mutex<()>; LOAD_STRIPES]>,
    broker: RecallBroker,
}

impl UsageApi {
    /// Returns the API over `counters`, loading credit balances from `billing` and noting spenders in
    /// `dirty` for the reporter, and recalling leases through `broker`.
    pub fn new(
        counters: Counters,
        billing: BillingClient,
        dirty: DirtyCustomers,
        broker: RecallBroker,
    ) -> Self {
        Self {
            counters,
            billing,
            dirty,
            loading: Arc::new(std::array::from_fn(|_| tokio::sync::Mutex::new(()))),
            broker,
        }
    }

    async fn load_credits(&self, customer: Uuid) -> Result<(), UsageError> {
        // A burst of requests from one cold customer would otherwise ask billing once per request.
        let stripe = &self.loading[(customer.as_u128() % LOAD_STRIPES as u128) as usize];
        let _loading = stripe.lock().await;
        if self.counters.credits_loaded(customer).await? {
            return Ok(());
        }
        let mut request = Request::new(billing_pb::GetCreditBalanceRequest {
            customer_id: customer.to_string(),
        });
        request.set_timeout(BILLING_DEADLINE);
        telemetry::traces::inject_into_metadata(
            &telemetry::traces::current(),
            request.metadata_mut(),
        );
        let balance = self
            .billing
            .clone()
            .get_credit_balance(request)
            .await
            .map_err(UsageError::Billing)?
            .into_inner();
        self.counters
            .load_credits(customer, balance.balance_micros, balance.as_of_sequence)
            .await?;
        tracing::info!(customer_id = %customer, "credits loaded from billing");
        Ok(())
    }

    async fn decide(&self, admission: &Admission) -> Result<Decision, UsageError> {
        let decided = self.decide_once(admission).await;
        count_admission(
            decided
                .as_ref()
                .map(|decision| decision.verdict)
                .map_err(|_| ()),
        );
        decided
    }

    async fn decide_once(&self, admission: &Admission) -> Result<Decision, UsageError> {
        let mut decision = self.timed_admit(admission).await?;
        if decision.verdict == Verdict::CreditsNotLoaded {
            self.load_credits(admission.customer).await?;
            decision = self.timed_admit(admission).await?;
        }
        if decision.verdict == Verdict::HeldElsewhere {
            self.recall(admission.customer).await?;
            decision = self.timed_admit_final(admission).await?;
        }
        if decision.verdict == Verdict::CreditsNotLoaded {
            return Err(UsageError::Redis(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "credits still not loaded after loading them",
            ))));
        }
        if decision.verdict == Verdict::Admitted && !decision.replayed {
            self.dirty.mark(admission.customer);
        }
        Ok(decision)
    }
}

impl UsageApi {
    async fn timed_admit(&self, admission: &Admission) -> redis::RedisResult<Decision> {
        let started = std::time::Instant::now();
        let decided = self.counters.admit(admission).await;
        metrics::histogram!("paygate_usage_script_duration_seconds").record(started.elapsed());
        decided
    }

    async fn timed_admit_final(&self, admission: &Admission) -> redis::RedisResult<Decision> {
        let started = std::time::Instant::now();
        let decided = self.counters.admit_final(admission).await;
        metrics::histogram!("paygate_usage_script_duration_seconds").record(started.elapsed());
        decided
    }

    /// Recalls `customer`'s outstanding leases from their holders and waits until they are back (returned
    /// or written off), at most USAGE_RECALL_WAIT_MS and never past the latest of their deadlines: a lease
    /// past its deadline gives nothing back anyway.
    async fn recall(&self, customer: Uuid) -> Result<(), UsageError> {
        // Subscribed before reading, so a return between the read and the wait is not missed.
        let mut returns = self.broker.returns();
        let held = self.counters.held_leases(customer).await?;
        if held.is_empty() {
            return Ok(());
        }
        let mut holders: Vec<Uuid> = held.iter().map(|lease| lease.holder).collect();
        holders.sort_unstable();
        holders.dedup();
        self.counters.publish_recall(customer, &holders).await?;
        metrics::counter!("paygate_usage_leases_recalled_total").increment(held.len() as u64);
        tracing::debug!(customer_id = %customer, leases = held.len(), "leases recalled");

        let latest_deadline_ms = held
            .iter()
            .map(|lease| lease.deadline_ms)
            .max()
            .unwrap_or(0);
        let until_deadline =
            Duration::from_millis(u64::try_from(latest_deadline_ms - now_ms()).unwrap_or(0));
        let wait = self
            .counters
            .lease_settings()
            .recall_wait
            .min(until_deadline);
        let give_up = tokio::time::Instant::now() + wait;
        let recalled: HashSet<String> = held.into_iter().map(|lease| lease.lease).collect();
        loop {
            match tokio::time::timeout_at(give_up, returns.recv()).await {
                Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return Ok(()),
                Ok(Ok(returned)) if returned != customer => continue,
                Ok(_) => {}
            }
            let still_held = self.counters.held_leases(customer).await?;
            if !still_held
                .iter()
                .any(|lease| recalled.contains(&lease.lease))
            {
                return Ok(());
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

fn invalid(message: impl Into<String>) -> UsageError {
    UsageError::InvalidArgument(message.into())
}

fn parse_uuid(field: &str, text: &str) -> Result<Uuid, UsageError> {
    Uuid::parse_str(text).map_err(|_| invalid(format!("`{field}` must be a UUID")))
}

fn timestamp_ms(field: &str, value: Option<&Timestamp>) -> Result<i64, UsageError> {
    let value = value.ok_or_else(|| invalid(format!("`{field}` is required")))?;
    if !(0..1_000_000_000).contains(&value.nanos) {
        return Err(invalid(format!("`{field}` must be a valid timestamp")));
    }
    value
        .seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(value.nanos / 1_000_000)))
        .ok_or_else(|| invalid(format!("`{field}` must be a valid timestamp")))
}

fn timestamp_of_ms(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn check_request_id(request_id: &str) -> Result<(), UsageError> {
    let valid = !request_id.is_empty()
        && request_id.len() <= 128
        && request_id.bytes().all(|byte| byte.is_ascii_graphic());
    if valid {
        Ok(())
    } else {
        Err(invalid(
            "`request_id` must be 1 to 128 visible ASCII characters",
        ))
    }
}

/// A plan's limits and quota period, validated.
struct Terms {
    rate_limit: u32,
    rate_period_ms: u32,
    burst: u32,
    included_units: i64,
    overage: Overage,
    period_start_ms: i64,
    period_end_ms: i64,
}

fn parse_terms(
    limits: Option<&billing_pb::Limits>,
    period_start: Option<&Timestamp>,
    period_end: Option<&Timestamp>,
    units: i64,
) -> Result<Terms, UsageError> {
    let limits = limits.ok_or_else(|| invalid("`limits` is required"))?;
    if limits.included_units < 0 {
        return Err(invalid("`limits.included_units` must not be negative"));
    }
    if limits.rate_limit > 0 && (limits.rate_period_ms == 0 || limits.burst == 0) {
        return Err(invalid(
            "`limits.rate_period_ms` and `limits.burst` must be positive when rate limited",
        ));
    }
    let overage = match billing_pb::OverageMode::try_from(limits.overage_mode) {
        Ok(billing_pb::OverageMode::Block) => Overage::Block,
        Ok(billing_pb::OverageMode::Credits) if limits.unit_price_micros > 0 => Overage::Credits {
            unit_price_micros: limits.unit_price_micros,
        },
        Ok(billing_pb::OverageMode::Credits) => {
            return Err(invalid(
                "`limits.unit_price_micros` must be positive with credits overage",
            ));
        }
        _ => return Err(invalid("`limits.overage_mode` is required")),
    };
    let period_start_ms = timestamp_ms("period_start", period_start)?;
    let period_end_ms = timestamp_ms("period_end", period_end)?;
    if period_end_ms <= period_start_ms {
        return Err(invalid("`period_end` must be after `period_start`"));
    }
    // Every unit must be payable without overflowing in the script (Lua numbers are doubles).
    if let Overage::Credits { unit_price_micros } = overage
        && units
            .checked_mul(unit_price_micros)
            .is_none_or(|cost| cost > 1 << 52)
    {
        return Err(invalid("`units` × `unit_price_micros` is too large"));
    }
    Ok(Terms {
        rate_limit: limits.rate_limit,
        rate_period_ms: limits.rate_period_ms,
        burst: limits.burst,
        included_units: limits.included_units,
        overage,
        period_start_ms,
        period_end_ms,
    })
}

fn parse_admission(request: &pb::AdmitRequest) -> Result<Admission, UsageError> {
    check_request_id(&request.request_id)?;
    let customer = parse_uuid("customer_id", &request.customer_id)?;
    let subscription = parse_uuid("subscription_id", &request.subscription_id)?;
    if request.units < 1 {
        return Err(invalid(format!(
            "`units` must be at least 1, got {}",
            request.units
        )));
    }
    let terms = parse_terms(
        request.limits.as_ref(),
        request.period_start.as_ref(),
        request.period_end.as_ref(),
        request.units,
    )?;
    Ok(Admission {
        request_id: request.request_id.clone(),
        customer,
        subscription,
        units: request.units,
        rate_limit: terms.rate_limit,
        rate_period_ms: terms.rate_period_ms,
        burst: terms.burst,
        included_units: terms.included_units,
        overage: terms.overage,
        period_start_ms: terms.period_start_ms,
        period_end_ms: terms.period_end_ms,
    })
}

fn parse_lease_ask(holder: Uuid, ask: &pb::LeaseAsk) -> Result<LeaseAsk, UsageError> {
    let lease = parse_uuid("lease_id", &ask.lease_id)?;
    let customer = parse_uuid("customer_id", &ask.customer_id)?;
    let subscription = parse_uuid("subscription_id", &ask.subscription_id)?;
    if ask.units_wanted < 1 || !(1..=ask.units_wanted).contains(&ask.min_units) {
        return Err(invalid(
            "`units_wanted` must be at least 1 and `min_units` between 1 and `units_wanted`",
        ));
    }
    let terms = parse_terms(
        ask.limits.as_ref(),
        ask.period_start.as_ref(),
        ask.period_end.as_ref(),
        ask.units_wanted,
    )?;
    Ok(LeaseAsk {
        holder,
        lease,
        customer,
        subscription,
        units_wanted: ask.units_wanted,
        slots_wanted: ask.slots_wanted,
        min_units: ask.min_units,
        rate_limit: terms.rate_limit,
        rate_period_ms: terms.rate_period_ms,
        burst: terms.burst,
        included_units: terms.included_units,
        overage: terms.overage,
        period_start_ms: terms.period_start_ms,
        period_end_ms: terms.period_end_ms,
    })
}

fn parse_lease_return(holder: Uuid, lease: &pb::LeaseReturn) -> Result<LeaseReturn, UsageError> {
    if lease.units_spent < 0 {
        return Err(invalid("`units_spent` must not be negative"));
    }
    Ok(LeaseReturn {
        holder,
        lease: parse_uuid("lease_id", &lease.lease_id)?,
        customer: parse_uuid("customer_id", &lease.customer_id)?,
        units_spent: lease.units_spent,
        first_unused_slot: lease.first_unused_slot,
    })
}

/// Prefixes a validation error with the batch item it is about (`item` and its index).
fn at_index(item: &str, index: usize, error: UsageError) -> UsageError {
    match error {
        UsageError::InvalidArgument(message) => invalid(format!("{item} {index}: {message}")),
        other => other,
    }
}

fn grant_to_proto(lease_id: Uuid, grant: &LeaseGrant, period_end_ms: i64) -> pb::LeaseGrant {
    pb::LeaseGrant {
        lease_id: lease_id.to_string(),
        quota_units: grant.quota_units,
        credit_units: grant.credit_units,
        unit_price_micros: grant.unit_price_micros,
        slots: grant.slots,
        first_slot_offset_us: grant.first_slot_offset_us,
        emission_us: grant.emission_us,
        tolerance_us: grant.tolerance_us,
        ttl_ms: grant.ttl_ms,
        quota_used: grant.quota_used,
        quota_limit: grant.quota_limit,
        quota_resets_at: Some(timestamp_of_ms(period_end_ms)),
        credits_remaining_micros: grant.credits_remaining,
        replayed: grant.replayed,
        error: String::new(),
    }
}

fn returned_to_proto(lease_id: Uuid, outcome: LeaseOutcome) -> pb::LeaseReturned {
    let (outcome, units_given_back, error) = match outcome {
        LeaseOutcome::Returned { units_given_back } => {
            (pb::LeaseOutcome::Returned, units_given_back, "")
        }
        LeaseOutcome::AlreadyReturned { units_given_back } => {
            (pb::LeaseOutcome::AlreadyReturned, units_given_back, "")
        }
        LeaseOutcome::WrittenOff { .. } => (pb::LeaseOutcome::WrittenOff, 0, ""),
        LeaseOutcome::Unknown => (pb::LeaseOutcome::Unknown, 0, ""),
        LeaseOutcome::Overspent => (
            pb::LeaseOutcome::Unspecified,
            0,
            "`units_spent` is more than the lease held",
        ),
    };
    pb::LeaseReturned {
        lease_id: lease_id.to_string(),
        outcome: outcome.into(),
        units_given_back,
        error: error.to_owned(),
    }
}

fn decision_to_proto(decision: &Decision, period_end_ms: i64) -> pb::AdmitResponse {
    let verdict = match decision.verdict {
        Verdict::Admitted => pb::Decision::Admitted,
        Verdict::RateLimited => pb::Decision::RateLimited,
        Verdict::QuotaExhausted => pb::Decision::QuotaExhausted,
        Verdict::CreditsExhausted => pb::Decision::CreditsExhausted,
        Verdict::CreditsNotLoaded | Verdict::HeldElsewhere => pb::Decision::Unspecified,
    };
    pb::AdmitResponse {
        decision: verdict.into(),
        replayed: decision.replayed,
        quota_used: decision.quota_used,
        quota_limit: decision.quota_limit,
        quota_resets_at: Some(timestamp_of_ms(period_end_ms)),
        units_from_quota: decision.units_from_quota,
        credits_taken_micros: decision.credits_taken,
        credits_remaining_micros: decision.credits_remaining,
        retry_after_ms: decision.retry_after_ms,
        rate_remaining: decision.rate_remaining,
        rate_reset_ms: decision.rate_reset_ms,
        error: String::new(),
    }
}

fn failed_decision() -> pb::AdmitResponse {
    pb::AdmitResponse {
        error: "this request could not be decided".to_owned(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::usage_server::Usage for UsageApi {
    #[tracing::instrument(skip_all, fields(customer_id = %request.get_ref().customer_id))]
    async fn admit(
        &self,
        request: Request<pb::AdmitRequest>,
    ) -> Result<Response<pb::AdmitResponse>, Status> {
        let admission = parse_admission(request.get_ref())?;
        let decision = self.decide(&admission).await?;
        Ok(Response::new(decision_to_proto(
            &decision,
            admission.period_end_ms,
        )))
    }

    #[tracing::instrument(skip_all, fields(requests = request.get_ref().requests.len()))]
    async fn admit_batch(
        &self,
        request: Request<pb::AdmitBatchRequest>,
    ) -> Result<Response<pb::AdmitBatchResponse>, Status> {
        let batch = request.into_inner();
        if batch.requests.len() > MAX_BATCH {
            return Err(invalid(format!("a batch carries at most {MAX_BATCH} requests")).into());
        }
        let admissions = batch
            .requests
            .iter()
            .enumerate()
            .map(|(index, request)| {
                parse_admission(request).map_err(|error| match error {
                    UsageError::InvalidArgument(message) => {
                        invalid(format!("request {index}: {message}"))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let started = std::time::Instant::now();
        let decided = self.counters.admit_many(&admissions).await;
        metrics::histogram!("paygate_usage_script_duration_seconds").record(started.elapsed());
        let mut results = match decided {
            Ok(results) => results,
            Err(error) => {
                admissions.iter().for_each(|_| count_admission(Err(())));
                return Err(UsageError::from(error).into());
            }
        };
        let unloaded: BTreeSet<Uuid> = results
            .iter()
            .zip(&admissions)
            .filter(|(result, _)| matches!(result, Ok(decision) if decision.verdict == Verdict::CreditsNotLoaded))
            .map(|(_, admission)| admission.customer)
            .collect();
        if !unloaded.is_empty() {
            let mut loaded = HashSet::new();
            for customer in unloaded {
                match self.load_credits(customer).await {
                    Ok(()) => {
                        loaded.insert(customer);
                    }
                    Err(error) => {
                        tracing::warn!(customer_id = %customer, %error, "credit load failed")
                    }
                }
            }
            for (result, admission) in results.iter_mut().zip(&admissions) {
                if matches!(result, Ok(decision) if decision.verdict == Verdict::CreditsNotLoaded) {
                    *result = if loaded.contains(&admission.customer) {
                        self.timed_admit(admission).await
                    } else {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "credits could not be loaded",
                        )))
                    };
                }
            }
        }

        let held: BTreeSet<Uuid> = results
            .iter()
            .zip(&admissions)
            .filter(|(result, _)| matches!(result, Ok(decision) if decision.verdict == Verdict::HeldElsewhere))
            .map(|(_, admission)| admission.customer)
            .collect();
        if !held.is_empty() {
            // Recalled together, so the batch waits once, not once per customer.
            let recalls: Vec<_> = held
                .into_iter()
                .map(|customer| {
                    let api = self.clone();
                    tokio::spawn(async move { (customer, api.recall(customer).await) })
                })
                .collect();
            for recall in recalls {
                if let Ok((customer, Err(error))) = recall.await {
                    tracing::warn!(customer_id = %customer, %error, "lease recall failed");
                }
            }
            for (result, admission) in results.iter_mut().zip(&admissions) {
                if matches!(result, Ok(decision) if decision.verdict == Verdict::HeldElsewhere) {
                    *result = self.timed_admit_final(admission).await;
                }
            }
        }

        let mut decisions = Vec::with_capacity(results.len());
        for (result, admission) in results.into_iter().zip(&admissions) {
            count_admission(
                result
                    .as_ref()
                    .map(|decision| decision.verdict)
                    .map_err(|_| ()),
            );
            decisions.push(match result {
                Ok(decision)
                    if !matches!(
                        decision.verdict,
                        Verdict::CreditsNotLoaded | Verdict::HeldElsewhere
                    ) =>
                {
                    if decision.verdict == Verdict::Admitted && !decision.replayed {
                        self.dirty.mark(admission.customer);
                    }
                    decision_to_proto(&decision, admission.period_end_ms)
                }
                Ok(_) => failed_decision(),
                Err(error) => {
                    tracing::error!(customer_id = %admission.customer, %error, "admission failed");
                    failed_decision()
                }
            });
        }
        Ok(Response::new(pb::AdmitBatchResponse { decisions }))
    }

    #[tracing::instrument(skip_all, fields(customer_id = %request.get_ref().customer_id))]
    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let refund = request.into_inner();
        check_request_id(&refund.request_id)?;
        let customer = parse_uuid("customer_id", &refund.customer_id)?;
        let refunded = if refund.lease_id.is_empty() {
            self.counters.refund(customer, &refund.request_id).await
        } else {
            let lease = parse_uuid("lease_id", &refund.lease_id)?;
            if refund.units < 1 {
                return Err(invalid("`units` must be at least 1 with `lease_id`").into());
            }
            self.counters
                .refund_from_lease(customer, lease, &refund.request_id, refund.units)
                .await
        }
        .map_err(UsageError::from)?;
        if refunded.refunded {
            self.dirty.mark(customer);
            tracing::info!(customer_id = %customer, units = refunded.units, credits = refunded.credits, "admission refunded");
        }
        Ok(Response::new(pb::RefundResponse {
            refunded: refunded.refunded,
            units: refunded.units,
            credits_micros: refunded.credits,
        }))
    }

    #[tracing::instrument(skip_all, fields(customer_id = %request.get_ref().customer_id))]
    async fn grant_credits(
        &self,
        request: Request<pb::GrantCreditsRequest>,
    ) -> Result<Response<pb::GrantCreditsResponse>, Status> {
        let grant = request.into_inner();
        let customer = parse_uuid("customer_id", &grant.customer_id)?;
        if grant.reference.is_empty() || grant.reference.len() > 512 {
            return Err(invalid("`reference` must be 1 to 512 characters").into());
        }
        if grant.delta_micros == 0 || grant.sequence < 0 {
            return Err(
                invalid("`delta_micros` must not be zero and `sequence` not negative").into(),
            );
        }
        let (applied, balance) = self
            .counters
            .grant(
                customer,
                &grant.reference,
                grant.delta_micros,
                grant.sequence,
            )
            .await
            .map_err(UsageError::from)?;
        Ok(Response::new(pb::GrantCreditsResponse {
            applied,
            balance_micros: balance,
        }))
    }

    #[tracing::instrument(skip_all, fields(customer_id = %request.get_ref().customer_id))]
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let query = request.into_inner();
        let customer = parse_uuid("customer_id", &query.customer_id)?;
        let subscription = parse_uuid("subscription_id", &query.subscription_id)?;
        let period_start_ms = timestamp_ms("period_start", query.period_start.as_ref())?;
        let figures = self
            .counters
            .usage(customer, subscription, period_start_ms)
            .await
            .map_err(UsageError::from)?;
        Ok(Response::new(pb::GetUsageResponse {
            units_used: figures.units_used,
            credits_remaining_micros: figures.credits_remaining,
            unreported_units: figures.unreported_units,
            unreported_credits_micros: figures.unreported_credits,
        }))
    }

    #[tracing::instrument(skip_all, fields(holder_id = %request.get_ref().holder_id, asks = request.get_ref().asks.len()))]
    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let lease = request.into_inner();
        let holder = parse_uuid("holder_id", &lease.holder_id)?;
        if lease.asks.is_empty() || lease.asks.len() > MAX_BATCH {
            return Err(invalid(format!("a lease call carries 1 to {MAX_BATCH} asks")).into());
        }
        let asks = lease
            .asks
            .iter()
            .enumerate()
            .map(|(index, ask)| {
                parse_lease_ask(holder, ask).map_err(|error| at_index("ask", index, error))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Concurrent on the one multiplexed connection: a call of many asks costs about one round trip.
        let pending: Vec<_> = asks
            .iter()
            .map(|ask| {
                let counters = self.counters.clone();
                let ask = ask.clone();
                tokio::spawn(async move { counters.grant_lease(&ask).await })
            })
            .collect();
        let mut grants = Vec::with_capacity(asks.len());
        for (ask, granted) in asks.iter().zip(pending) {
            let granted = granted.await.unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "lease grant task failed",
                )))
            });
            grants.push(match granted {
                Ok(grant) => {
                    count_written_off(u64::from(grant.written_off));
                    if !grant.is_empty() && !grant.replayed {
                        metrics::counter!("paygate_usage_leases_granted_total").increment(1);
                    }
                    grant_to_proto(ask.lease, &grant, ask.period_end_ms)
                }
                Err(error) => {
                    tracing::error!(customer_id = %ask.customer, %error, "lease grant failed");
                    pb::LeaseGrant {
                        lease_id: ask.lease.to_string(),
                        error: "this ask could not be decided".to_owned(),
                        ..Default::default()
                    }
                }
            });
        }
        Ok(Response::new(pb::LeaseResponse { grants }))
    }

    #[tracing::instrument(skip_all, fields(holder_id = %request.get_ref().holder_id, returns = request.get_ref().returns.len()))]
    async fn return_leases(
        &self,
        request: Request<pb::ReturnLeasesRequest>,
    ) -> Result<Response<pb::ReturnLeasesResponse>, Status> {
        let returning = request.into_inner();
        let holder = parse_uuid("holder_id", &returning.holder_id)?;
        if returning.returns.is_empty() || returning.returns.len() > MAX_BATCH {
            return Err(invalid(format!("a return call carries 1 to {MAX_BATCH} returns")).into());
        }
        let returns = returning
            .returns
            .iter()
            .enumerate()
            .map(|(index, lease)| {
                parse_lease_return(holder, lease).map_err(|error| at_index("return", index, error))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut results = Vec::with_capacity(returns.len());
        for lease in &returns {
            results.push(match self.counters.return_lease(lease).await {
                Ok(outcome) => {
                    match outcome {
                        LeaseOutcome::Returned { .. } => {
                            metrics::counter!("paygate_usage_leases_returned_total").increment(1);
                            if lease.units_spent > 0 {
                                self.dirty.mark(lease.customer);
                            }
                        }
                        LeaseOutcome::WrittenOff { now: true } => count_written_off(1),
                        _ => {}
                    }
                    returned_to_proto(lease.lease, outcome)
                }
                Err(error) => {
                    tracing::error!(customer_id = %lease.customer, %error, "lease return failed");
                    pb::LeaseReturned {
                        lease_id: lease.lease.to_string(),
                        error: "this return could not be processed".to_owned(),
                        ..Default::default()
                    }
                }
            });
        }
        Ok(Response::new(pb::ReturnLeasesResponse { results }))
    }

    type WatchRecallsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Recall, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(holder_id = %request.get_ref().holder_id))]
    async fn watch_recalls(
        &self,
        request: Request<pb::WatchRecallsRequest>,
    ) -> Result<Response<Self::WatchRecallsStream>, Status> {
        let holder = parse_uuid("holder_id", &request.get_ref().holder_id)?;
        let recalls = self.broker.recalls(holder).map(|customer| {
            Ok(pb::Recall {
                customer_id: customer.to_string(),
            })
        });
        Ok(Response::new(Box::pin(recalls)))
    }
}

/// Returns the period start of a sealed entry as a proto timestamp.
pub fn period_start_timestamp(period_start_ms: i64) -> Timestamp {
    timestamp_of_ms(period_start_ms)
}
