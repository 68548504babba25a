//! The transport adapter: proto requests in, validation, one transaction per mutation, proto responses
//! out. SQL lives in `store`, rules in `domain`.

use std::{pin::Pin, sync::Arc};

use prost_types::Timestamp;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use time::{Duration, OffsetDateTime};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use proto::billing::v1 as pb;

use crate::{
    Clock,
    changes::{ChangeFeed, FeedItem},
    domain::{
        self, CustomerId, EndReason, Interval, KeyId, OverageMode, PlanId, PlanTerms, Standing,
        Status as SubStatus, SubscriptionFacts, SubscriptionId, SubscriptionState,
    },
    error::{BillingError, is_unique_violation},
    store::{self, Change, CustomerRow, KeyRow, LedgerRow, PaymentRow, PlanRow, SubscriptionRow},
};

type Result<T, E = BillingError> = std::result::Result<T, E>;

/// What both APIs share: the database and the clock.
#[derive(Clone)]
pub struct State {
    pub db: PgPool,
    pub clock: Arc<dyn Clock>,
}

/// Serves `BillingAdmin`.
#[derive(Clone)]
pub struct AdminApi {
    state: State,
}

impl AdminApi {
    /// Returns the admin API over `state`.
    pub fn new(state: State) -> Self {
        Self { state }
    }
}

/// Serves `Entitlements`.
#[derive(Clone)]
pub struct EntitlementsApi {
    state: State,
    feed: ChangeFeed,
}

impl EntitlementsApi {
    /// Returns the internal API over `state`, streaming changes from `feed`.
    pub fn new(state: State, feed: ChangeFeed) -> Self {
        Self { state, feed }
    }
}

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;
const MAX_ROTATION_GRACE_SECONDS: u32 = 30 * 24 * 3600;
const MAX_REPORT_ENTRIES: usize = 10_000;

fn timestamp(instant: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: instant.unix_timestamp(),
        nanos: i32::try_from(instant.nanosecond()).unwrap_or(0),
    }
}

fn optional_timestamp(instant: Option<OffsetDateTime>) -> Option<Timestamp> {
    instant.map(timestamp)
}

fn parse_timestamp(field: &str, value: Option<&Timestamp>) -> Result<OffsetDateTime> {
    let invalid = || BillingError::InvalidArgument(format!("`{field}` must be a valid timestamp"));
    let value =
        value.ok_or_else(|| BillingError::InvalidArgument(format!("`{field}` is required")))?;
    let nanos = i128::from(value.seconds) * 1_000_000_000 + i128::from(value.nanos);
    if !(0..1_000_000_000).contains(&value.nanos) {
        return Err(invalid());
    }
    OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| invalid())
}

fn page_size(requested: u32) -> Result<i64> {
    match requested {
        0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        1..=MAX_PAGE_SIZE => Ok(i64::from(requested)),
        _ => Err(BillingError::InvalidArgument(format!(
            "`page_size` must be at most {MAX_PAGE_SIZE}, got {requested}"
        ))),
    }
}

/// Cuts `rows` (fetched with one extra) to `limit` and returns the token of the next page: the last kept
/// row's key when there is more, else empty.
fn trim_to_page<T>(rows: &mut Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> String {
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    if more {
        rows.last().map(key).unwrap_or_default()
    } else {
        String::new()
    }
}

fn invalid_page_token() -> BillingError {
    BillingError::InvalidArgument("`page_token` is not one this API returned".to_owned())
}

fn uuid_page_token(token: &str) -> Result<Option<Uuid>> {
    if token.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(token)
        .map(Some)
        .map_err(|_| invalid_page_token())
}

/// Returns the `paygate-actor` metadata of the call (or `admin`), checked.
fn actor<T>(request: &Request<T>) -> Result<String> {
    match request.metadata().get("paygate-actor") {
        None => Ok("admin".to_owned()),
        Some(value) => {
            let actor = value.to_str().map_err(|_| {
                BillingError::InvalidArgument("`paygate-actor` must be printable ASCII".to_owned())
            })?;
            domain::check_length("paygate-actor", actor, 1, 128)?;
            Ok(actor.to_owned())
        }
    }
}

fn interval_of(plan_interval: &str) -> Result<Interval> {
    Interval::from_db(plan_interval).ok_or_else(|| {
        BillingError::Database(sqlx::Error::Protocol(format!(
            "unknown billing interval `{plan_interval}`"
        )))
    })
}

fn facts_of(row: &SubscriptionRow) -> SubscriptionFacts {
    SubscriptionFacts {
        started_at: row.started_at,
        anchor: row.anchor,
        trial_ends_at: row.trial_ends_at,
        paid_through: row.paid_through,
        last_payment_at: row.last_payment_at,
        payment_failed_at: row.payment_failed_at,
        cancel_at: row.cancel_at,
        ended_at: row.ended_at,
        end_reason: row.end_reason.as_deref().and_then(EndReason::from_db),
    }
}

fn state_of(row: &SubscriptionRow, now: OffsetDateTime) -> Result<SubscriptionState> {
    let terms = PlanTerms {
        price_micros: row.plan_price_micros,
        interval: interval_of(&row.plan_interval)?,
        grace: Duration::seconds(i64::from(row.plan_grace_period_seconds)),
    };
    Ok(domain::evaluate(&facts_of(row), &terms, now))
}

fn status_to_proto(status: SubStatus) -> pb::SubscriptionStatus {
    match status {
        SubStatus::Trialing => pb::SubscriptionStatus::Trialing,
        SubStatus::Active => pb::SubscriptionStatus::Active,
        SubStatus::PastDue => pb::SubscriptionStatus::PastDue,
        SubStatus::Canceled => pb::SubscriptionStatus::Canceled,
        SubStatus::Expired => pb::SubscriptionStatus::Expired,
    }
}

fn subscription_to_proto(row: &SubscriptionRow, now: OffsetDateTime) -> Result<pb::Subscription> {
    let state = state_of(row, now)?;
    Ok(pb::Subscription {
        id: row.id.to_string(),
        customer_id: row.customer_id.to_string(),
        plan_id: row.plan_id.to_string(),
        plan_code: row.plan_code.clone(),
        status: status_to_proto(state.status).into(),
        current_period_start: Some(timestamp(state.period.start)),
        current_period_end: Some(timestamp(state.period.end)),
        paid_through: Some(timestamp(row.paid_through)),
        trial_ends_at: optional_timestamp(row.trial_ends_at),
        past_due_since: optional_timestamp(state.past_due_since),
        grace_ends_at: optional_timestamp(state.grace_ends_at),
        cancel_at_period_end: row.cancel_at.is_some() && row.ended_at.is_none(),
        cancel_at: optional_timestamp(row.cancel_at),
        ended_at: optional_timestamp(state.ended_at),
        created_at: Some(timestamp(row.created_at)),
    })
}

fn customer_to_proto(row: CustomerRow) -> pb::Customer {
    pb::Customer {
        id: row.id.to_string(),
        external_id: row.external_id,
        name: row.name,
        email: row.email,
        currency: row.currency,
        created_at: Some(timestamp(row.created_at)),
    }
}

fn plan_to_proto(row: PlanRow) -> pb::Plan {
    let interval = match Interval::from_db(&row.billing_interval) {
        Some(Interval::Day) => pb::BillingInterval::Day,
        Some(Interval::Week) => pb::BillingInterval::Week,
        Some(Interval::Month) => pb::BillingInterval::Month,
        Some(Interval::Year) => pb::BillingInterval::Year,
        None => pb::BillingInterval::Unspecified,
    };
    pb::Plan {
        id: row.id.to_string(),
        code: row.code,
        name: row.name,
        currency: row.currency,
        price_micros: row.price_micros,
        interval: interval.into(),
        included_units: row.included_units,
        rate_limit: u32::try_from(row.rate_limit).unwrap_or(0),
        rate_period_ms: u32::try_from(row.rate_period_ms).unwrap_or(0),
        burst: u32::try_from(row.burst).unwrap_or(0),
        overage_mode: overage_to_proto(&row.overage_mode).into(),
        unit_price_micros: row.unit_price_micros,
        grace_period_seconds: u32::try_from(row.grace_period_seconds).unwrap_or(0),
        trial_days: u32::try_from(row.trial_days).unwrap_or(0),
        features: row.features,
        archived_at: optional_timestamp(row.archived_at),
        created_at: Some(timestamp(row.created_at)),
    }
}

fn overage_to_proto(mode: &str) -> pb::OverageMode {
    match OverageMode::from_db(mode) {
        Some(OverageMode::Block) => pb::OverageMode::Block,
        Some(OverageMode::Credits) => pb::OverageMode::Credits,
        None => pb::OverageMode::Unspecified,
    }
}

fn ledger_to_proto(row: LedgerRow) -> pb::LedgerEntry {
    let kind = match row.kind.as_str() {
        "top_up" => pb::LedgerEntryKind::TopUp,
        "usage" => pb::LedgerEntryKind::Usage,
        "refund" => pb::LedgerEntryKind::Refund,
        "adjustment" => pb::LedgerEntryKind::Adjustment,
        _ => pb::LedgerEntryKind::Unspecified,
    };
    pb::LedgerEntry {
        id: row.id,
        customer_id: row.customer_id.to_string(),
        kind: kind.into(),
        delta_micros: row.delta_micros,
        reference: row.reference,
        note: row.note,
        created_at: Some(timestamp(row.created_at)),
    }
}

fn key_to_proto(row: KeyRow) -> pb::ApiKey {
    pb::ApiKey {
        id: row.id.to_string(),
        customer_id: row.customer_id.to_string(),
        name: row.name,
        prefix: row.prefix,
        created_at: Some(timestamp(row.created_at)),
        expires_at: optional_timestamp(row.expires_at),
        revoked_at: optional_timestamp(row.revoked_at),
        replaces_key_id: row
            .replaces_key_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
    }
}

fn payment_to_proto(row: PaymentRow) -> pb::Payment {
    let purpose = match row.purpose.as_str() {
        "subscription" => pb::PaymentPurpose::Subscription,
        "credit_top_up" => pb::PaymentPurpose::CreditTopUp,
        _ => pb::PaymentPurpose::Unspecified,
    };
    let outcome = match row.outcome.as_str() {
        "succeeded" => pb::PaymentOutcome::Succeeded,
        "failed" => pb::PaymentOutcome::Failed,
        _ => pb::PaymentOutcome::Unspecified,
    };
    pb::Payment {
        id: row.id.to_string(),
        idempotency_key: row.idempotency_key,
        customer_id: row.customer_id.to_string(),
        subscription_id: row
            .subscription_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        purpose: purpose.into(),
        outcome: outcome.into(),
        amount_micros: row.amount_micros,
        currency: row.currency,
        provider_reference: row.provider_reference,
        failure_reason: row.failure_reason,
        ledger_entry_id: row.ledger_entry_id.unwrap_or(0),
        paid_through: optional_timestamp(row.paid_through),
        created_at: Some(timestamp(row.created_at)),
    }
}

async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    target_type: &str,
    target_id: impl ToString,
    details: serde_json::Value,
) -> Result<()> {
    store::insert_audit_event(
        conn,
        actor,
        action,
        target_type,
        &target_id.to_string(),
        &details,
    )
    .await?;
    Ok(())
}

async fn require_customer(conn: &mut PgConnection, id: CustomerId) -> Result<CustomerRow> {
    store::lock_customer(conn, id)
        .await?
        .ok_or(BillingError::NotFound("customer"))
}

/// Locks a subscription and its customer, customer first (the order every transaction uses).
async fn lock_subscription_and_customer(
    conn: &mut PgConnection,
    id: SubscriptionId,
) -> Result<(CustomerRow, SubscriptionRow)> {
    let unlocked = store::get_subscription(&mut *conn, id)
        .await?
        .ok_or(BillingError::NotFound("subscription"))?;
    let customer = require_customer(conn, unlocked.customer_id.into()).await?;
    let subscription = store::lock_subscription(conn, id)
        .await?
        .ok_or(BillingError::NotFound("subscription"))?;
    Ok((customer, subscription))
}

fn usable_plan(plan: Option<PlanRow>, customer: &CustomerRow) -> Result<PlanRow> {
    let plan = plan.ok_or(BillingError::NotFound("plan"))?;
    if plan.archived_at.is_some() {
        return Err(BillingError::FailedPrecondition(format!(
            "plan `{}` is archived",
            plan.code
        )));
    }
    if plan.currency != customer.currency {
        return Err(BillingError::FailedPrecondition(format!(
            "plan `{}` is priced in {} but the customer pays in {}",
            plan.code, plan.currency, customer.currency
        )));
    }
    Ok(plan)
}

fn request_digest(parts: &[&str]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_vec()
}

fn non_negative_i32(field: &str, value: u32) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| BillingError::InvalidArgument(format!("`{field}` is too large")))
}

fn validated_plan(plan: pb::CreatePlanRequest) -> Result<PlanRow> {
    domain::check_plan_code(&plan.code)?;
    domain::check_length("name", &plan.name, 0, 256)?;
    let currency = domain::parse_currency(&plan.currency)?;
    if plan.price_micros < 0 {
        return Err(BillingError::InvalidArgument(format!(
            "`price_micros` must not be negative, got {}",
            plan.price_micros
        )));
    }
    let interval = match pb::BillingInterval::try_from(plan.interval) {
        Ok(pb::BillingInterval::Day) => Interval::Day,
        Ok(pb::BillingInterval::Week) => Interval::Week,
        Ok(pb::BillingInterval::Month) => Interval::Month,
        Ok(pb::BillingInterval::Year) => Interval::Year,
        _ => {
            return Err(BillingError::InvalidArgument(
                "`interval` is required".to_owned(),
            ));
        }
    };
    if plan.included_units < 0 {
        return Err(BillingError::InvalidArgument(format!(
            "`included_units` must not be negative, got {}",
            plan.included_units
        )));
    }
    let (rate_period_ms, burst) = if plan.rate_limit == 0 {
        (0, 0)
    } else {
        let period = if plan.rate_period_ms == 0 {
            1_000
        } else {
            plan.rate_period_ms
        };
        if period > 86_400_000 {
            return Err(BillingError::InvalidArgument(format!(
                "`rate_period_ms` must be at most 86400000, got {period}"
            )));
        }
        (period, plan.burst.max(1))
    };
    let overage_mode = match pb::OverageMode::try_from(plan.overage_mode) {
        Ok(pb::OverageMode::Block) => OverageMode::Block,
        Ok(pb::OverageMode::Credits) => OverageMode::Credits,
        _ => {
            return Err(BillingError::InvalidArgument(
                "`overage_mode` is required".to_owned(),
            ));
        }
    };
    match overage_mode {
        OverageMode::Credits if plan.unit_price_micros <= 0 => {
            return Err(BillingError::InvalidArgument(
                "`unit_price_micros` must be positive when overage is paid from credits".to_owned(),
            ));
        }
        OverageMode::Block if plan.unit_price_micros != 0 => {
            return Err(BillingError::InvalidArgument(
                "`unit_price_micros` must be 0 when overage is blocked".to_owned(),
            ));
        }
        _ => {}
    }
    if plan.grace_period_seconds > 366 * 86_400 {
        return Err(BillingError::InvalidArgument(
            "`grace_period_seconds` must be at most a year".to_owned(),
        ));
    }
    if plan.trial_days > 366 {
        return Err(BillingError::InvalidArgument(
            "`trial_days` must be at most 366".to_owned(),
        ));
    }
    Ok(PlanRow {
        id: PlanId::new().as_uuid(),
        code: plan.code,
        name: plan.name,
        currency,
        price_micros: plan.price_micros,
        billing_interval: interval.as_str().to_owned(),
        included_units: plan.included_units,
        rate_limit: non_negative_i32("rate_limit", plan.rate_limit)?,
        rate_period_ms: non_negative_i32("rate_period_ms", rate_period_ms)?,
        burst: non_negative_i32("burst", burst)?,
        overage_mode: overage_mode.as_str().to_owned(),
        unit_price_micros: plan.unit_price_micros,
        grace_period_seconds: non_negative_i32("grace_period_seconds", plan.grace_period_seconds)?,
        trial_days: non_negative_i32("trial_days", plan.trial_days)?,
        features: domain::normalize_features(plan.features)?,
        archived_at: None,
        created_at: OffsetDateTime::UNIX_EPOCH,
    })
}

/// Returns the ledger entry an idempotent credit call made before, if `reference` was used; a different
/// request with the same reference is `AlreadyExists`.
async fn replayed_ledger_entry(
    conn: &mut PgConnection,
    reference: &str,
    customer: CustomerId,
    delta_micros: i64,
    note: &str,
) -> Result<Option<LedgerRow>> {
    match store::get_ledger_entry_by_reference(conn, reference).await? {
        None => Ok(None),
        Some(entry)
            if entry.customer_id == customer.as_uuid()
                && entry.delta_micros == delta_micros
                && entry.note == note =>
        {
            Ok(Some(entry))
        }
        Some(_) => Err(BillingError::AlreadyExists(format!(
            "reference `{reference}` was used for a different request"
        ))),
    }
}

fn check_reference(reference: &str) -> Result<()> {
    domain::check_length("reference", reference, 1, 200)
}

/// A change an operator makes to a balance without a payment: a grant or an adjustment.
struct OperatorCredit<'a> {
    customer: CustomerId,
    /// Ledger kind: `top_up` or `adjustment`.
    kind: &'static str,
    /// Audit action.
    action: &'static str,
    delta_micros: i64,
    /// The ledger reference, unique; the same request again returns the first entry.
    reference: String,
    note: &'a str,
    /// Refuse a change that would take the balance below zero.
    keep_non_negative: bool,
}

impl AdminApi {
    /// Appends an operator's credit change to the ledger (once per reference), audits it and announces it
    /// on the change feed, in one transaction.
    async fn apply_operator_credit(
        &self,
        actor: &str,
        credit: OperatorCredit<'_>,
    ) -> Result<LedgerRow> {
        let mut tx = self.state.db.begin().await?;
        require_customer(&mut tx, credit.customer).await?;
        if let Some(entry) = replayed_ledger_entry(
            &mut tx,
            &credit.reference,
            credit.customer,
            credit.delta_micros,
            credit.note,
        )
        .await?
        {
            return Ok(entry);
        }
        if credit.keep_non_negative {
            let balance = store::credit_balance(&mut *tx, credit.customer).await?;
            if balance.saturating_add(credit.delta_micros) < 0 {
                return Err(BillingError::FailedPrecondition(format!(
                    "the adjustment would take the balance below zero (balance {balance}, adjustment {})",
                    credit.delta_micros
                )));
            }
        }
        let entry = store::append_ledger_entry(
            &mut *tx,
            credit.customer,
            credit.kind,
            credit.delta_micros,
            &credit.reference,
            credit.note,
        )
        .await?
        .ok_or_else(|| {
            BillingError::AlreadyExists(format!("reference `{}` exists", credit.reference))
        })?;
        let details = serde_json::json!({
            "customer_id": credit.customer.to_string(), "delta_micros": credit.delta_micros,
            "reference": credit.reference, "note": credit.note,
        });
        audit(&mut tx, actor, credit.action, "ledger", entry.id, details).await?;
        let change = Change::Credits {
            customer: credit.customer.as_uuid(),
            reference: credit.reference,
            delta_micros: credit.delta_micros,
        };
        store::publish_change(&mut tx, &change).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn record_payment_effects(
        &self,
        conn: &mut PgConnection,
        payment: &PaymentRow,
        customer: CustomerId,
        now: OffsetDateTime,
    ) -> Result<()> {
        match (payment.purpose.as_str(), payment.outcome.as_str()) {
            ("subscription", outcome) => {
                let current = store::current_subscription(&mut *conn, customer)
                    .await?
                    .filter(|row| row.ended_at.is_none())
                    .ok_or_else(|| {
                        BillingError::FailedPrecondition(
                            "the customer has no live subscription to pay".to_owned(),
                        )
                    })?;
                let subscription = store::lock_subscription(&mut *conn, current.id.into())
                    .await?
                    .ok_or(BillingError::NotFound("subscription"))?;
                if !state_of(&subscription, now)?.is_live() {
                    return Err(BillingError::FailedPrecondition(
                        "the customer's subscription has ended".to_owned(),
                    ));
                }
                let paid_through = if outcome == "succeeded" {
                    let renewal = domain::renew(
                        &facts_of(&subscription),
                        interval_of(&subscription.plan_interval)?,
                        now,
                    );
                    store::record_renewal(
                        &mut *conn,
                        subscription.id,
                        renewal.paid_through,
                        renewal.anchor,
                        now,
                    )
                    .await?;
                    Some(renewal.paid_through)
                } else {
                    store::record_failed_renewal(&mut *conn, subscription.id, now).await?;
                    None
                };
                store::set_payment_effects(
                    &mut *conn,
                    payment.id,
                    Some(subscription.id),
                    None,
                    paid_through,
                )
                .await?;
            }
            ("credit_top_up", "succeeded") => {
                let reference = format!("payment:{}", payment.id);
                let entry = store::append_ledger_entry(
                    &mut *conn,
                    customer,
                    "top_up",
                    payment.amount_micros,
                    &reference,
                    "",
                )
                .await?
                .ok_or_else(|| {
                    BillingError::AlreadyExists(format!("ledger reference `{reference}` exists"))
                })?;
                store::set_payment_effects(&mut *conn, payment.id, None, Some(entry.id), None)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::billing_admin_server::BillingAdmin for AdminApi {
    #[tracing::instrument(skip_all)]
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let actor = actor(&request)?;
        let customer = request.into_inner();
        domain::check_length("external_id", &customer.external_id, 1, 128)?;
        domain::check_length("name", &customer.name, 0, 256)?;
        domain::check_length("email", &customer.email, 0, 256)?;
        let currency = domain::parse_currency(&customer.currency)?;

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let id = CustomerId::new();
        let row = store::insert_customer(
            &mut *tx,
            id,
            &customer.external_id,
            &customer.name,
            &customer.email,
            &currency,
        )
        .await
        .map_err(|error| {
            if is_unique_violation(&error, "customers_external_id_key") {
                BillingError::AlreadyExists(format!(
                    "a customer with external id `{}` exists",
                    customer.external_id
                ))
            } else {
                error.into()
            }
        })?;
        let details =
            serde_json::json!({ "external_id": row.external_id, "currency": row.currency });
        audit(&mut tx, &actor, "customer.create", "customer", id, details).await?;
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(customer_id = %id, "customer created");
        Ok(Response::new(customer_to_proto(row)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let lookup = request.into_inner();
        let row = match (lookup.customer_id.as_str(), lookup.external_id.as_str()) {
            (id, "") => store::get_customer(&self.state.db, CustomerId::parse(id)?).await,
            ("", external_id) => {
                store::get_customer_by_external_id(&self.state.db, external_id).await
            }
            _ => {
                return Err(BillingError::InvalidArgument(
                    "set one of `customer_id` and `external_id`, not both".to_owned(),
                )
                .into());
            }
        }
        .map_err(BillingError::from)?
        .ok_or(BillingError::NotFound("customer"))?;
        Ok(Response::new(customer_to_proto(row)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let page = request.into_inner();
        let limit = page_size(page.page_size)?;
        let after = uuid_page_token(&page.page_token)?;
        let mut rows = store::list_customers(&self.state.db, after, limit + 1)
            .await
            .map_err(BillingError::from)?;
        let next_page_token = trim_to_page(&mut rows, limit, |row| row.id.to_string());
        Ok(Response::new(pb::ListCustomersResponse {
            customers: rows.into_iter().map(customer_to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        let actor = actor(&request)?;
        let plan = validated_plan(request.into_inner())?;

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let row = store::insert_plan(&mut *tx, &plan).await.map_err(|error| {
            if is_unique_violation(&error, "plans_code_key") {
                BillingError::AlreadyExists(format!("a plan with code `{}` exists", plan.code))
            } else {
                error.into()
            }
        })?;
        let details = serde_json::json!({
            "code": row.code, "price_micros": row.price_micros, "interval": row.billing_interval,
            "included_units": row.included_units, "overage_mode": row.overage_mode,
        });
        audit(&mut tx, &actor, "plan.create", "plan", row.id, details).await?;
        tx.commit().await.map_err(BillingError::from)?;
        Ok(Response::new(plan_to_proto(row)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_plans(
        &self,
        request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let rows = store::list_plans(&self.state.db, request.get_ref().include_archived)
            .await
            .map_err(BillingError::from)?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: rows.into_iter().map(plan_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn archive_plan(
        &self,
        request: Request<pb::ArchivePlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        let actor = actor(&request)?;
        let id = PlanId::parse(&request.get_ref().plan_id)?;
        let now = self.state.clock.now();

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let before = store::get_plan(&mut *tx, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("plan"))?;
        let row = store::archive_plan(&mut *tx, id, now)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("plan"))?;
        if before.archived_at.is_none() {
            audit(
                &mut tx,
                &actor,
                "plan.archive",
                "plan",
                id,
                serde_json::json!({ "code": row.code }),
            )
            .await?;
        }
        tx.commit().await.map_err(BillingError::from)?;
        Ok(Response::new(plan_to_proto(row)))
    }

    #[tracing::instrument(skip_all)]
    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let actor = actor(&request)?;
        let customer_id = CustomerId::parse(&request.get_ref().customer_id)?;
        let plan_id = PlanId::parse(&request.get_ref().plan_id)?;
        let now = self.state.clock.now();

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let customer = require_customer(&mut tx, customer_id).await?;
        let plan = usable_plan(
            store::get_plan(&mut *tx, plan_id)
                .await
                .map_err(BillingError::from)?,
            &customer,
        )?;
        if let Some(current) = store::current_subscription(&mut *tx, customer_id)
            .await
            .map_err(BillingError::from)?
            .filter(|row| row.ended_at.is_none())
        {
            let state = state_of(&current, now)?;
            match state.ended_at {
                None => {
                    return Err(BillingError::FailedPrecondition(format!(
                        "customer already has a live subscription `{}`",
                        current.id
                    ))
                    .into());
                }
                // It ended by the passage of time; record that so the one-live-subscription rule admits
                // the new one.
                Some(ended_at) => {
                    let reason = if state.status == SubStatus::Expired {
                        EndReason::Expired
                    } else {
                        EndReason::Canceled
                    };
                    store::mark_subscription_ended(&mut *tx, current.id, ended_at, reason.as_str())
                        .await
                        .map_err(BillingError::from)?;
                }
            }
        }
        let trial_ends_at =
            (plan.trial_days > 0).then(|| now + Duration::days(i64::from(plan.trial_days)));
        let anchor = trial_ends_at.unwrap_or(now);
        let id = SubscriptionId::new();
        let new = store::NewSubscription {
            id,
            customer_id,
            plan_id,
            started_at: now,
            anchor,
            trial_ends_at,
            paid_through: anchor,
        };
        store::insert_subscription(&mut *tx, &new)
            .await
            .map_err(|error| {
                if is_unique_violation(&error, "subscriptions_one_live_per_customer") {
                    BillingError::FailedPrecondition(
                        "customer already has a live subscription".to_owned(),
                    )
                } else {
                    error.into()
                }
            })?;
        let details =
            serde_json::json!({ "customer_id": customer_id.to_string(), "plan_code": plan.code });
        audit(
            &mut tx,
            &actor,
            "subscription.create",
            "subscription",
            id,
            details,
        )
        .await?;
        store::publish_change(
            &mut tx,
            &Change::Customer {
                customer: customer_id.as_uuid(),
            },
        )
        .await
        .map_err(BillingError::from)?;
        let row = store::get_subscription(&mut *tx, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("subscription"))?;
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(customer_id = %customer_id, subscription_id = %id, "subscription created");
        Ok(Response::new(subscription_to_proto(&row, now)?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let id = SubscriptionId::parse(&request.get_ref().subscription_id)?;
        let row = store::get_subscription(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("subscription"))?;
        Ok(Response::new(subscription_to_proto(
            &row,
            self.state.clock.now(),
        )?))
    }

    #[tracing::instrument(skip_all)]
    async fn get_customer_subscription(
        &self,
        request: Request<pb::GetCustomerSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let id = CustomerId::parse(&request.get_ref().customer_id)?;
        let now = self.state.clock.now();
        store::get_customer(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("customer"))?;
        let row = store::current_subscription(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("live subscription"))?;
        if !state_of(&row, now)?.is_live() {
            return Err(BillingError::NotFound("live subscription").into());
        }
        Ok(Response::new(subscription_to_proto(&row, now)?))
    }

    #[tracing::instrument(skip_all)]
    async fn change_subscription_plan(
        &self,
        request: Request<pb::ChangeSubscriptionPlanRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let actor = actor(&request)?;
        let id = SubscriptionId::parse(&request.get_ref().subscription_id)?;
        let plan_id = PlanId::parse(&request.get_ref().plan_id)?;
        let now = self.state.clock.now();

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let (customer, subscription) = lock_subscription_and_customer(&mut tx, id).await?;
        if !state_of(&subscription, now)?.is_live() {
            return Err(
                BillingError::FailedPrecondition("the subscription has ended".to_owned()).into(),
            );
        }
        let plan = usable_plan(
            store::get_plan(&mut *tx, plan_id)
                .await
                .map_err(BillingError::from)?,
            &customer,
        )?;
        store::set_subscription_plan(&mut *tx, subscription.id, plan_id)
            .await
            .map_err(BillingError::from)?;
        let details =
            serde_json::json!({ "from_plan": subscription.plan_code, "to_plan": plan.code });
        audit(
            &mut tx,
            &actor,
            "subscription.change_plan",
            "subscription",
            id,
            details,
        )
        .await?;
        store::publish_change(
            &mut tx,
            &Change::Customer {
                customer: customer.id,
            },
        )
        .await
        .map_err(BillingError::from)?;
        let row = store::get_subscription(&mut *tx, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("subscription"))?;
        tx.commit().await.map_err(BillingError::from)?;
        Ok(Response::new(subscription_to_proto(&row, now)?))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_subscription(
        &self,
        request: Request<pb::CancelSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let actor = actor(&request)?;
        let id = SubscriptionId::parse(&request.get_ref().subscription_id)?;
        let at_period_end = request.get_ref().at_period_end;
        let now = self.state.clock.now();

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let (customer, subscription) = lock_subscription_and_customer(&mut tx, id).await?;
        let state = state_of(&subscription, now)?;
        if !state.is_live() {
            return Err(BillingError::FailedPrecondition(
                "the subscription has already ended".to_owned(),
            )
            .into());
        }
        if at_period_end {
            if subscription.cancel_at.is_some() {
                tx.rollback().await.map_err(BillingError::from)?;
                return Ok(Response::new(subscription_to_proto(&subscription, now)?));
            }
            store::set_cancel_at(&mut *tx, subscription.id, state.period.end)
                .await
                .map_err(BillingError::from)?;
        } else {
            store::mark_subscription_ended(
                &mut *tx,
                subscription.id,
                now,
                EndReason::Canceled.as_str(),
            )
            .await
            .map_err(BillingError::from)?;
        }
        let details = serde_json::json!({ "at_period_end": at_period_end });
        audit(
            &mut tx,
            &actor,
            "subscription.cancel",
            "subscription",
            id,
            details,
        )
        .await?;
        store::publish_change(
            &mut tx,
            &Change::Customer {
                customer: customer.id,
            },
        )
        .await
        .map_err(BillingError::from)?;
        let row = store::get_subscription(&mut *tx, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("subscription"))?;
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(subscription_id = %id, at_period_end, "subscription cancelled");
        Ok(Response::new(subscription_to_proto(&row, now)?))
    }

    #[tracing::instrument(skip_all)]
    async fn record_payment(
        &self,
        request: Request<pb::RecordPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let actor = actor(&request)?;
        let payment = request.into_inner();
        domain::check_length("idempotency_key", &payment.idempotency_key, 1, 255)?;
        let customer_id = CustomerId::parse(&payment.customer_id)?;
        let purpose = match pb::PaymentPurpose::try_from(payment.purpose) {
            Ok(pb::PaymentPurpose::Subscription) => "subscription",
            Ok(pb::PaymentPurpose::CreditTopUp) => "credit_top_up",
            _ => {
                return Err(
                    BillingError::InvalidArgument("`purpose` is required".to_owned()).into(),
                );
            }
        };
        let outcome = match pb::PaymentOutcome::try_from(payment.outcome) {
            Ok(pb::PaymentOutcome::Succeeded) => "succeeded",
            Ok(pb::PaymentOutcome::Failed) => "failed",
            _ => {
                return Err(
                    BillingError::InvalidArgument("`outcome` is required".to_owned()).into(),
                );
            }
        };
        if payment.amount_micros <= 0 {
            return Err(BillingError::InvalidArgument(format!(
                "`amount_micros` must be positive, got {}",
                payment.amount_micros
            ))
            .into());
        }
        domain::check_length("provider_reference", &payment.provider_reference, 0, 255)?;
        domain::check_length("failure_reason", &payment.failure_reason, 0, 1024)?;
        if outcome == "succeeded" && !payment.failure_reason.is_empty() {
            return Err(BillingError::InvalidArgument(
                "`failure_reason` is only for failed payments".to_owned(),
            )
            .into());
        }
        let amount = payment.amount_micros.to_string();
        let digest = request_digest(&[
            &payment.customer_id,
            purpose,
            outcome,
            &amount,
            &payment.provider_reference,
            &payment.failure_reason,
        ]);
        let replay = |existing: PaymentRow| -> Result<Response<pb::Payment>, Status> {
            if existing.request_digest == digest {
                Ok(Response::new(payment_to_proto(existing)))
            } else {
                Err(BillingError::AlreadyExists(format!(
                    "idempotency key `{}` was used for a different request",
                    payment.idempotency_key
                ))
                .into())
            }
        };
        if let Some(existing) = store::get_payment_by_key(&self.state.db, &payment.idempotency_key)
            .await
            .map_err(BillingError::from)?
        {
            return replay(existing);
        }

        let now = self.state.clock.now();
        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let customer = require_customer(&mut tx, customer_id).await?;
        let row = PaymentRow {
            id: Uuid::now_v7(),
            idempotency_key: payment.idempotency_key.clone(),
            request_digest: digest.clone(),
            customer_id: customer.id,
            subscription_id: None,
            purpose: purpose.to_owned(),
            outcome: outcome.to_owned(),
            amount_micros: payment.amount_micros,
            currency: customer.currency.clone(),
            provider_reference: payment.provider_reference.clone(),
            failure_reason: payment.failure_reason.clone(),
            ledger_entry_id: None,
            paid_through: None,
            created_at: now,
        };
        // A concurrent call with the same key waits here for the first transaction, then inserts nothing.
        if !store::insert_payment(&mut *tx, &row)
            .await
            .map_err(BillingError::from)?
        {
            tx.rollback().await.map_err(BillingError::from)?;
            let existing = store::get_payment_by_key(&self.state.db, &payment.idempotency_key)
                .await
                .map_err(BillingError::from)?
                .ok_or(BillingError::NotFound("payment"))?;
            return replay(existing);
        }
        self.record_payment_effects(&mut tx, &row, customer_id, now)
            .await?;
        let recorded = store::get_payment_by_key(&mut *tx, &payment.idempotency_key)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("payment"))?;
        let details = serde_json::json!({
            "idempotency_key": recorded.idempotency_key, "customer_id": customer_id.to_string(),
            "purpose": purpose, "outcome": outcome, "amount_micros": recorded.amount_micros,
        });
        audit(
            &mut tx,
            &actor,
            "payment.record",
            "payment",
            recorded.id,
            details,
        )
        .await?;
        let change = match recorded.ledger_entry_id {
            Some(_) => Change::Credits {
                customer: customer.id,
                reference: format!("payment:{}", recorded.id),
                delta_micros: recorded.amount_micros,
            },
            None => Change::Customer {
                customer: customer.id,
            },
        };
        if purpose == "subscription" || recorded.ledger_entry_id.is_some() {
            store::publish_change(&mut tx, &change)
                .await
                .map_err(BillingError::from)?;
        }
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(customer_id = %customer_id, purpose, outcome, "payment recorded");
        Ok(Response::new(payment_to_proto(recorded)))
    }

    #[tracing::instrument(skip_all)]
    async fn grant_credits(
        &self,
        request: Request<pb::GrantCreditsRequest>,
    ) -> Result<Response<pb::LedgerEntry>, Status> {
        let actor = actor(&request)?;
        let grant = request.into_inner();
        let customer_id = CustomerId::parse(&grant.customer_id)?;
        if grant.amount_micros <= 0 {
            return Err(BillingError::InvalidArgument(format!(
                "`amount_micros` must be positive, got {}",
                grant.amount_micros
            ))
            .into());
        }
        check_reference(&grant.reference)?;
        domain::check_length("note", &grant.note, 0, 1024)?;

        let credit = OperatorCredit {
            customer: customer_id,
            kind: "top_up",
            action: "credits.grant",
            delta_micros: grant.amount_micros,
            reference: format!("grant:{}", grant.reference),
            note: &grant.note,
            keep_non_negative: false,
        };
        Ok(Response::new(ledger_to_proto(
            self.apply_operator_credit(&actor, credit).await?,
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn adjust_credits(
        &self,
        request: Request<pb::AdjustCreditsRequest>,
    ) -> Result<Response<pb::LedgerEntry>, Status> {
        let actor = actor(&request)?;
        let adjustment = request.into_inner();
        let customer_id = CustomerId::parse(&adjustment.customer_id)?;
        if adjustment.delta_micros == 0 {
            return Err(BillingError::InvalidArgument(
                "`delta_micros` must not be zero".to_owned(),
            )
            .into());
        }
        check_reference(&adjustment.reference)?;
        domain::check_length("note", &adjustment.note, 1, 1024)?;

        let credit = OperatorCredit {
            customer: customer_id,
            kind: "adjustment",
            action: "credits.adjust",
            delta_micros: adjustment.delta_micros,
            reference: format!("adjustment:{}", adjustment.reference),
            note: &adjustment.note,
            keep_non_negative: true,
        };
        Ok(Response::new(ledger_to_proto(
            self.apply_operator_credit(&actor, credit).await?,
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn get_credit_balance(
        &self,
        request: Request<pb::GetCreditBalanceRequest>,
    ) -> Result<Response<pb::CreditBalance>, Status> {
        let id = CustomerId::parse(&request.get_ref().customer_id)?;
        Ok(Response::new(read_balance(&self.state.db, id).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        let page = request.into_inner();
        let id = CustomerId::parse(&page.customer_id)?;
        let limit = page_size(page.page_size)?;
        let after = if page.page_token.is_empty() {
            0
        } else {
            page.page_token
                .parse::<i64>()
                .map_err(|_| invalid_page_token())?
        };
        store::get_customer(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("customer"))?;
        let mut rows = store::list_ledger_entries(&self.state.db, id, after, limit + 1)
            .await
            .map_err(BillingError::from)?;
        let next_page_token = trim_to_page(&mut rows, limit, |row| row.id.to_string());
        Ok(Response::new(pb::ListLedgerEntriesResponse {
            entries: rows.into_iter().map(ledger_to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn issue_api_key(
        &self,
        request: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssuedApiKey>, Status> {
        let actor = actor(&request)?;
        let issue = request.into_inner();
        let customer_id = CustomerId::parse(&issue.customer_id)?;
        domain::check_length("name", &issue.name, 0, 128)?;

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        require_customer(&mut tx, customer_id).await?;
        let (row, secret) = issue_key(&mut tx, customer_id, &issue.name, None).await?;
        let details = serde_json::json!({ "customer_id": customer_id.to_string(), "prefix": row.prefix, "name": row.name });
        audit(&mut tx, &actor, "api_key.issue", "api_key", row.id, details).await?;
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(customer_id = %customer_id, key_id = %row.id, "api key issued");
        Ok(Response::new(pb::IssuedApiKey {
            key: Some(key_to_proto(row)),
            secret,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let id = CustomerId::parse(&request.get_ref().customer_id)?;
        store::get_customer(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("customer"))?;
        let rows = store::list_keys(&self.state.db, id)
            .await
            .map_err(BillingError::from)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: rows.into_iter().map(key_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let actor = actor(&request)?;
        let id = KeyId::parse(&request.get_ref().key_id)?;
        let now = self.state.clock.now();

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let key = store::lock_key(&mut *tx, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("api key"))?;
        if key.revoked_at.is_some() {
            tx.rollback().await.map_err(BillingError::from)?;
            return Ok(Response::new(key_to_proto(key)));
        }
        let row = store::revoke_key(&mut *tx, key.id, now)
            .await
            .map_err(BillingError::from)?;
        let details =
            serde_json::json!({ "customer_id": row.customer_id.to_string(), "prefix": row.prefix });
        audit(&mut tx, &actor, "api_key.revoke", "api_key", id, details).await?;
        let change = Change::Key {
            customer: row.customer_id,
            digest: row.digest.clone(),
        };
        store::publish_change(&mut tx, &change)
            .await
            .map_err(BillingError::from)?;
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(key_id = %id, "api key revoked");
        Ok(Response::new(key_to_proto(row)))
    }

    #[tracing::instrument(skip_all)]
    async fn rotate_api_key(
        &self,
        request: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::IssuedApiKey>, Status> {
        let actor = actor(&request)?;
        let id = KeyId::parse(&request.get_ref().key_id)?;
        let grace_seconds = request.get_ref().grace_seconds;
        if grace_seconds > MAX_ROTATION_GRACE_SECONDS {
            return Err(BillingError::InvalidArgument(format!(
                "`grace_seconds` must be at most {MAX_ROTATION_GRACE_SECONDS}"
            ))
            .into());
        }
        let now = self.state.clock.now();

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        let old = store::lock_key(&mut *tx, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("api key"))?;
        if old.revoked_at.is_some() || old.expires_at.is_some_and(|at| at <= now) {
            return Err(BillingError::FailedPrecondition(
                "the api key is no longer usable".to_owned(),
            )
            .into());
        }
        let customer_id = CustomerId::from(old.customer_id);
        let (new, secret) = issue_key(&mut tx, customer_id, &old.name, Some(old.id)).await?;
        let retired = if grace_seconds == 0 {
            store::revoke_key(&mut *tx, old.id, now).await
        } else {
            store::expire_key(
                &mut *tx,
                old.id,
                now + Duration::seconds(i64::from(grace_seconds)),
            )
            .await
        }
        .map_err(BillingError::from)?;
        let details = serde_json::json!({
            "customer_id": customer_id.to_string(), "old_prefix": retired.prefix, "new_key_id": new.id.to_string(),
            "new_prefix": new.prefix, "grace_seconds": grace_seconds,
        });
        audit(&mut tx, &actor, "api_key.rotate", "api_key", id, details).await?;
        let change = Change::Key {
            customer: retired.customer_id,
            digest: retired.digest.clone(),
        };
        store::publish_change(&mut tx, &change)
            .await
            .map_err(BillingError::from)?;
        tx.commit().await.map_err(BillingError::from)?;
        tracing::info!(key_id = %id, new_key_id = %new.id, "api key rotated");
        Ok(Response::new(pb::IssuedApiKey {
            key: Some(key_to_proto(new)),
            secret,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_customer_usage(
        &self,
        request: Request<pb::GetCustomerUsageRequest>,
    ) -> Result<Response<pb::GetCustomerUsageResponse>, Status> {
        let id = CustomerId::parse(&request.get_ref().customer_id)?;
        let limit = match request.get_ref().max_periods {
            0 => 12,
            periods => i64::from(periods.min(MAX_PAGE_SIZE)),
        };
        store::get_customer(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("customer"))?;
        let rows = store::list_period_usage(&self.state.db, id, limit)
            .await
            .map_err(BillingError::from)?;
        Ok(Response::new(pb::GetCustomerUsageResponse {
            periods: rows
                .into_iter()
                .map(|row| pb::PeriodUsage {
                    subscription_id: row.subscription_id.to_string(),
                    period_start: Some(timestamp(row.period_start)),
                    units: row.units,
                    credits_micros: row.credits_micros,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(customer_id = %request.get_ref().customer_id))]
    async fn get_customer_stats(
        &self,
        request: Request<pb::GetCustomerStatsRequest>,
    ) -> Result<Response<pb::GetCustomerStatsResponse>, Status> {
        let asked = request.into_inner();
        let id = CustomerId::parse(&asked.customer_id)?;
        let to = match &asked.to {
            Some(to) => parse_timestamp("to", Some(to))?,
            None => self.state.clock.now(),
        };
        let from = match &asked.from {
            Some(from) => parse_timestamp("from", Some(from))?,
            None => to - time::Duration::hours(24),
        };
        if from >= to || to - from > time::Duration::days(31) {
            return Err(BillingError::InvalidArgument(
                "`from` must be before `to`, at most 31 days apart".to_owned(),
            )
            .into());
        }
        store::get_customer(&self.state.db, id)
            .await
            .map_err(BillingError::from)?
            .ok_or(BillingError::NotFound("customer"))?;
        let rows = store::list_hour_stats(&self.state.db, id, from, to)
            .await
            .map_err(BillingError::from)?;
        Ok(Response::new(pb::GetCustomerStatsResponse {
            hours: rows.into_iter().map(hour_stats_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let page = request.into_inner();
        let limit = page_size(page.page_size)?;
        let before = uuid_page_token(&page.page_token)?;
        let target = (!page.target_id.is_empty()).then_some(page.target_id.as_str());
        let mut rows = store::list_audit_events(&self.state.db, target, before, limit + 1)
            .await
            .map_err(BillingError::from)?;
        let next_page_token = trim_to_page(&mut rows, limit, |row| row.id.to_string());
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: rows
                .into_iter()
                .map(|row| pb::AuditEvent {
                    id: row.id.to_string(),
                    actor: row.actor,
                    action: row.action,
                    target_type: row.target_type,
                    target_id: row.target_id,
                    details_json: row.details.to_string(),
                    created_at: Some(timestamp(row.created_at)),
                })
                .collect(),
            next_page_token,
        }))
    }
}

async fn issue_key(
    conn: &mut PgConnection,
    customer: CustomerId,
    name: &str,
    replaces: Option<Uuid>,
) -> Result<(KeyRow, String)> {
    let minted = domain::mint_api_key();
    let row = store::insert_key(
        &mut *conn,
        KeyId::new(),
        customer,
        name,
        &minted.prefix,
        &minted.digest,
        replaces,
    )
    .await?;
    // A digest may sit in a gateway's negative cache if someone guessed it; tell gateways it exists now.
    store::publish_change(
        conn,
        &Change::Key {
            customer: customer.as_uuid(),
            digest: minted.digest.to_vec(),
        },
    )
    .await?;
    Ok((row, minted.secret))
}

/// Returns the last applied usage outbox sequence of each of `customers`, keyed by customer id.
async fn read_outbox_sequences(
    db: impl sqlx::PgExecutor<'_>,
    customers: &[Uuid],
) -> Result<std::collections::HashMap<String, i64>> {
    if customers.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let mut sequences: std::collections::HashMap<String, i64> = customers
        .iter()
        .map(|customer| (customer.to_string(), 0))
        .collect();
    for (customer, sequence) in store::usage_outbox_sequences(db, customers).await? {
        sequences.insert(customer.to_string(), sequence);
    }
    Ok(sequences)
}

/// Reads the balance, the feed sequence and the last applied usage outbox in one snapshot, so a credit
/// change is either in the balance or after the sequence, never both or neither, and likewise an outbox.
async fn read_balance(db: &PgPool, id: CustomerId) -> Result<pb::CreditBalance> {
    let mut tx = db.begin().await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let customer = store::get_customer(&mut *tx, id)
        .await?
        .ok_or(BillingError::NotFound("customer"))?;
    let balance = store::credit_balance(&mut *tx, id).await?;
    let (sequence, _) = store::change_feed_bounds(&mut *tx).await?;
    let outbox_sequence = store::usage_outbox_sequence(&mut *tx, id).await?;
    tx.commit().await?;
    Ok(pb::CreditBalance {
        customer_id: id.to_string(),
        balance_micros: balance,
        currency: customer.currency,
        as_of_sequence: sequence,
        outbox_sequence,
    })
}

fn standing_to_proto(standing: Standing) -> pb::Standing {
    match standing {
        Standing::Good => pb::Standing::Good,
        Standing::PastDueInGrace => pb::Standing::PastDueInGrace,
        Standing::PastDue => pb::Standing::PastDue,
        Standing::NoSubscription => pb::Standing::NoSubscription,
        Standing::Inactive => pb::Standing::Inactive,
    }
}

/// The one answer for unknown, revoked and expired keys alike.
fn key_not_found() -> Status {
    Status::not_found("api key not found")
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::ChangeEvent, Status>> + Send>>;

fn change_event(item: sqlx::Result<FeedItem>) -> Result<pb::ChangeEvent, Status> {
    use pb::change_event::Change as Event;

    let item = item.map_err(BillingError::from)?;
    Ok(match item {
        FeedItem::Heartbeat(sequence) => pb::ChangeEvent {
            sequence,
            change: Some(Event::Heartbeat(pb::Heartbeat {})),
        },
        FeedItem::Reset(sequence) => pb::ChangeEvent {
            sequence,
            change: Some(Event::Reset(pb::Reset {})),
        },
        FeedItem::Change(row) => {
            let customer_id = row.customer_id.to_string();
            let change = match row.kind.as_str() {
                "key" => Event::KeyChanged(pb::KeyChanged {
                    key_digest: row.key_digest.unwrap_or_default(),
                    customer_id,
                }),
                "credits" => Event::CreditsChanged(pb::CreditsChanged {
                    customer_id,
                    reference: row.reference.unwrap_or_default(),
                    delta_micros: row.delta_micros.unwrap_or_default(),
                }),
                _ => Event::CustomerChanged(pb::CustomerChanged { customer_id }),
            };
            pb::ChangeEvent {
                sequence: row.sequence,
                change: Some(change),
            }
        }
    })
}

#[tonic::async_trait]
impl pb::entitlements_server::Entitlements for EntitlementsApi {
    type WatchChangesStream = ChangeStream;

    #[tracing::instrument(skip_all)]
    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::Entitlement>, Status> {
        let digest = &request.get_ref().key_digest;
        if digest.len() != 32 {
            return Err(BillingError::InvalidArgument(
                "`key_digest` must be 32 bytes (SHA-256)".to_owned(),
            )
            .into());
        }
        let now = self.state.clock.now();
        let store::ResolvedEntitlement { key, subscription } =
            store::resolve_entitlement(&self.state.db, digest, now)
                .await
                .map_err(BillingError::from)?
                .ok_or_else(key_not_found)?;
        let customer_id = CustomerId::from(key.customer_id);
        let mut entitlement = pb::Entitlement {
            key_id: key.key_id.to_string(),
            customer_id: customer_id.to_string(),
            customer_external_id: key.external_id,
            standing: pb::Standing::NoSubscription.into(),
            currency: key.currency,
            valid_until: optional_timestamp(key.expires_at),
            ..Default::default()
        };
        if let Some((subscription, plan)) = subscription {
            let state = state_of(&subscription, now)?;
            let valid_until = [state.valid_until, key.expires_at]
                .into_iter()
                .flatten()
                .min();
            entitlement.standing = standing_to_proto(domain::standing(&state, now)).into();
            entitlement.subscription_id = subscription.id.to_string();
            entitlement.plan_code = plan.code.clone();
            entitlement.subscription_status = status_to_proto(state.status).into();
            entitlement.limits = Some(pb::Limits {
                included_units: plan.included_units,
                rate_limit: u32::try_from(plan.rate_limit).unwrap_or(0),
                rate_period_ms: u32::try_from(plan.rate_period_ms).unwrap_or(0),
                burst: u32::try_from(plan.burst).unwrap_or(0),
                overage_mode: overage_to_proto(&plan.overage_mode).into(),
                unit_price_micros: plan.unit_price_micros,
            });
            entitlement.features = plan.features;
            entitlement.period_start = Some(timestamp(state.period.start));
            entitlement.period_end = Some(timestamp(state.period.end));
            entitlement.grace_ends_at = optional_timestamp(state.grace_ends_at);
            entitlement.valid_until = optional_timestamp(valid_until);
        }
        Ok(Response::new(entitlement))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        let after = request.get_ref().after_sequence;
        if after < 0 {
            return Err(BillingError::InvalidArgument(
                "`after_sequence` must not be negative".to_owned(),
            )
            .into());
        }
        let items = ReceiverStream::new(self.feed.watch(after));
        let subscriber = Subscriber::counted();
        Ok(Response::new(Box::pin(items.map(move |event| {
            let _counted_while_streaming = &subscriber;
            change_event(event)
        }))))
    }

    #[tracing::instrument(skip_all, fields(report_id = %request.get_ref().report_id))]
    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        let report = request.into_inner();
        domain::check_length("report_id", &report.report_id, 1, 128)?;
        if report.entries.len() > MAX_REPORT_ENTRIES {
            return Err(BillingError::InvalidArgument(format!(
                "a report carries at most {MAX_REPORT_ENTRIES} entries"
            ))
            .into());
        }
        let mut entries = Vec::with_capacity(report.entries.len());
        let mut seen = std::collections::HashSet::new();
        let mut canonical = vec![report.report_id.clone()];
        for entry in &report.entries {
            domain::check_length("entry_id", &entry.entry_id, 1, 128)?;
            let customer = CustomerId::parse(&entry.customer_id)?;
            let subscription = SubscriptionId::parse(&entry.subscription_id)?;
            let period_start = parse_timestamp("period_start", entry.period_start.as_ref())?;
            if !seen.insert(entry.entry_id.as_str()) {
                return Err(BillingError::InvalidArgument(format!(
                    "entry `{}` appears twice in the report",
                    entry.entry_id
                ))
                .into());
            }
            if entry.outbox_sequence < 0 {
                return Err(BillingError::InvalidArgument(
                    "`outbox_sequence` must not be negative".to_owned(),
                )
                .into());
            }
            canonical.extend([
                entry.entry_id.clone(),
                entry.customer_id.clone(),
                entry.subscription_id.clone(),
                period_start.unix_timestamp_nanos().to_string(),
                entry.units.to_string(),
                entry.credits_micros.to_string(),
            ]);
            // Unnumbered entries keep the digest they always had, so a report resent across an upgrade
            // is still recognised.
            if entry.outbox_sequence > 0 {
                canonical.push(entry.outbox_sequence.to_string());
            }
            entries.push((
                entry.entry_id.as_str(),
                customer,
                subscription,
                period_start,
                entry.units,
                entry.credits_micros,
                entry.outbox_sequence,
            ));
        }
        let numbered: Vec<Uuid> = entries
            .iter()
            .filter(|entry| entry.6 > 0)
            .map(|entry| entry.1.as_uuid())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let digest = request_digest(&canonical.iter().map(String::as_str).collect::<Vec<_>>());
        let replay = |existing: Vec<u8>,
                      outbox_sequences|
         -> Result<Response<pb::ReportUsageResponse>, Status> {
            if existing == digest {
                Ok(Response::new(pb::ReportUsageResponse {
                    duplicate: true,
                    applied_entries: 0,
                    outbox_sequences,
                }))
            } else {
                Err(BillingError::AlreadyExists(format!(
                    "report `{}` was applied with different contents",
                    report.report_id
                ))
                .into())
            }
        };
        if let Some(existing) = store::usage_report_digest(&self.state.db, &report.report_id)
            .await
            .map_err(BillingError::from)?
        {
            let sequences = read_outbox_sequences(&self.state.db, &numbered).await?;
            return replay(existing, sequences);
        }

        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        if !store::insert_usage_report(&mut *tx, &report.report_id, &digest)
            .await
            .map_err(BillingError::from)?
        {
            tx.rollback().await.map_err(BillingError::from)?;
            let existing = store::usage_report_digest(&self.state.db, &report.report_id)
                .await
                .map_err(BillingError::from)?
                .ok_or(BillingError::NotFound("usage report"))?;
            let sequences = read_outbox_sequences(&self.state.db, &numbered).await?;
            return replay(existing, sequences);
        }
        // Charges are capped at the balance, so the balance must not move under them: customers are
        // locked in one order (every transaction locks customers first), which also serialises the
        // outbox-sequence checks of replicas reporting one customer at once.
        let charged: std::collections::BTreeSet<Uuid> = entries
            .iter()
            .filter(|entry| entry.5 > 0)
            .map(|entry| entry.1.as_uuid())
            .collect();
        for &customer in &charged {
            store::lock_customer(&mut *tx, customer.into())
                .await
                .map_err(BillingError::from)?;
        }
        let mut outbox_applies = std::collections::HashMap::new();
        let mut applied_entries = 0;
        for (entry_id, customer, subscription, period_start, units, credits, outbox) in entries {
            if outbox > 0 {
                let applies = match outbox_applies.get(&(customer, outbox)) {
                    Some(&applies) => applies,
                    None => {
                        let applies =
                            store::advance_usage_outbox_sequence(&mut *tx, customer, outbox)
                                .await
                                .map_err(BillingError::from)?;
                        if !applies {
                            tracing::debug!(customer_id = %customer, outbox, "usage outbox applied before or stale; skipped");
                        }
                        outbox_applies.insert((customer, outbox), applies);
                        applies
                    }
                };
                if !applies {
                    continue;
                }
            }
            if !store::insert_usage_entry(&mut *tx, entry_id, &report.report_id)
                .await
                .map_err(BillingError::from)?
            {
                continue;
            }
            applied_entries += 1;
            let owner = store::subscription_owner(&mut *tx, subscription)
                .await
                .map_err(BillingError::from)?
                .ok_or(BillingError::NotFound("subscription"))?;
            if owner != customer.as_uuid() {
                return Err(BillingError::InvalidArgument(format!(
                    "subscription `{subscription}` does not belong to customer `{customer}`"
                ))
                .into());
            }
            let credits = if credits > 0 {
                let balance = store::credit_balance(&mut *tx, customer)
                    .await
                    .map_err(BillingError::from)?;
                if credits > balance {
                    tracing::warn!(customer_id = %customer, credits, balance, "usage charge exceeds the balance; charging the balance");
                }
                credits.min(balance.max(0))
            } else {
                credits
            };
            store::add_usage_totals(&mut *tx, subscription, period_start, units, credits)
                .await
                .map_err(BillingError::from)?;
            if credits != 0 {
                let kind = if credits > 0 { "usage" } else { "refund" };
                let reference = format!("usage:{entry_id}");
                store::append_ledger_entry(&mut *tx, customer, kind, -credits, &reference, "")
                    .await
                    .map_err(BillingError::from)?
                    .ok_or_else(|| {
                        BillingError::AlreadyExists(format!(
                            "ledger reference `{reference}` exists"
                        ))
                    })?;
            }
        }
        let outbox_sequences = read_outbox_sequences(&mut *tx, &numbered).await?;
        tx.commit().await.map_err(BillingError::from)?;
        Ok(Response::new(pb::ReportUsageResponse {
            duplicate: false,
            applied_entries,
            outbox_sequences,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_credit_balance(
        &self,
        request: Request<pb::GetCreditBalanceRequest>,
    ) -> Result<Response<pb::CreditBalance>, Status> {
        let id = CustomerId::parse(&request.get_ref().customer_id)?;
        Ok(Response::new(read_balance(&self.state.db, id).await?))
    }

    #[tracing::instrument(skip_all, fields(report_id = %request.get_ref().report_id, rows = request.get_ref().rows.len()))]
    async fn report_stats(
        &self,
        request: Request<pb::ReportStatsRequest>,
    ) -> Result<Response<pb::ReportStatsResponse>, Status> {
        let report = request.into_inner();
        domain::check_length("report_id", &report.report_id, 1, 128)?;
        if report.rows.len() > MAX_REPORT_ENTRIES {
            return Err(BillingError::InvalidArgument(format!(
                "a report carries at most {MAX_REPORT_ENTRIES} rows"
            ))
            .into());
        }
        let rows = report
            .rows
            .iter()
            .map(hour_stats_from_proto)
            .collect::<Result<Vec<_>>>()?;
        let mut tx = self.state.db.begin().await.map_err(BillingError::from)?;
        if !store::claim_stats_report(&mut *tx, &report.report_id)
            .await
            .map_err(BillingError::from)?
        {
            return Ok(Response::new(pb::ReportStatsResponse {}));
        }
        for row in &rows {
            if let Err(error) = store::add_hour_stats(&mut *tx, row).await {
                let unknown_customer = error
                    .as_database_error()
                    .is_some_and(|database| database.is_foreign_key_violation());
                return Err(if unknown_customer {
                    BillingError::NotFound("customer")
                } else {
                    BillingError::from(error)
                }
                .into());
            }
        }
        tx.commit().await.map_err(BillingError::from)?;
        Ok(Response::new(pb::ReportStatsResponse {}))
    }
}

/// One open change stream, counted in `paygate_billing_change_stream_subscribers` while it lives.
struct Subscriber;

impl Subscriber {
    fn counted() -> Self {
        metrics::gauge!("paygate_billing_change_stream_subscribers").increment(1.0);
        Self
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        metrics::gauge!("paygate_billing_change_stream_subscribers").decrement(1.0);
    }
}

fn hour_stats_from_proto(row: &pb::CustomerHourStats) -> Result<store::HourStatsRow> {
    let customer = CustomerId::parse(&row.customer_id)?;
    let hour = parse_timestamp("hour", row.hour.as_ref())?;
    if hour.unix_timestamp() % 3600 != 0 || hour.nanosecond() != 0 {
        return Err(BillingError::InvalidArgument(
            "`hour` must be the start of a UTC hour".to_owned(),
        ));
    }
    let counts = [
        row.admitted,
        row.upstream_2xx,
        row.upstream_4xx,
        row.upstream_5xx,
        row.upstream_other,
        row.upstream_latency_sum_us,
    ];
    if counts
        .iter()
        .chain(row.answered.values())
        .chain(&row.upstream_latency_buckets)
        .any(|count| *count < 0)
    {
        return Err(BillingError::InvalidArgument(
            "counts must not be negative".to_owned(),
        ));
    }
    if row.upstream_latency_buckets.len() > domain::UPSTREAM_LATENCY_BUCKETS_MS.len() + 1 {
        return Err(BillingError::InvalidArgument(format!(
            "at most {} latency buckets",
            domain::UPSTREAM_LATENCY_BUCKETS_MS.len() + 1
        )));
    }
    let mut answered = vec![0_i64; domain::ANSWER_CODES.len()];
    for (code, count) in &row.answered {
        let position = domain::ANSWER_CODES
            .iter()
            .position(|known| known == code)
            .ok_or_else(|| {
                BillingError::InvalidArgument(format!("unknown answer code `{code}`"))
            })?;
        answered[position] += count;
    }
    Ok(store::HourStatsRow {
        customer_id: customer.as_uuid(),
        hour,
        admitted: row.admitted,
        upstream_2xx: row.upstream_2xx,
        upstream_4xx: row.upstream_4xx,
        upstream_5xx: row.upstream_5xx,
        upstream_other: row.upstream_other,
        answered,
        units: row.units,
        credits_micros: row.credits_micros,
        upstream_latency_sum_us: row.upstream_latency_sum_us,
        upstream_latency_buckets: row.upstream_latency_buckets.clone(),
    })
}

fn hour_stats_to_proto(row: store::HourStatsRow) -> pb::HourStats {
    let upstream_answers: i64 = row.upstream_latency_buckets.iter().sum();
    pb::HourStats {
        hour: Some(timestamp(row.hour)),
        admitted: row.admitted,
        upstream_2xx: row.upstream_2xx,
        upstream_4xx: row.upstream_4xx,
        upstream_5xx: row.upstream_5xx,
        upstream_other: row.upstream_other,
        answered: domain::ANSWER_CODES
            .iter()
            .zip(&row.answered)
            .filter(|(_, count)| **count > 0)
            .map(|(code, count)| ((*code).to_owned(), *count))
            .collect(),
        units: row.units,
        credits_micros: row.credits_micros,
        upstream_latency_mean_ms: if upstream_answers > 0 {
            row.upstream_latency_sum_us as f64 / upstream_answers as f64 / 1_000.0
        } else {
            0.0
        },
        upstream_latency_p95_ms: domain::latency_quantile_ms(&row.upstream_latency_buckets, 0.95),
    }
}
