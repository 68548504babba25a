//! Every SQL statement billing runs. Functions take any executor, so `grpc` chooses between the pool and
//! a transaction; none of them sees a proto type.

use sqlx::PgExecutor;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{CustomerId, KeyId, PlanId, SubscriptionId};

/// A customer as stored.
#[derive(Debug, Clone)]
pub struct CustomerRow {
    pub id: Uuid,
    pub external_id: String,
    pub name: String,
    pub email: String,
    pub currency: String,
    pub created_at: OffsetDateTime,
}

/// Inserts a customer; fails with a unique violation on `customers_external_id_key` when taken.
pub async fn insert_customer(
    db: impl PgExecutor<'_>,
    id: CustomerId,
    external_id: &str,
    name: &str,
    email: &str,
    currency: &str,
) -> sqlx::Result<CustomerRow> {
    sqlx::query_as!(
        CustomerRow,
        r#"INSERT INTO customers (id, external_id, name, email, currency)
           VALUES ($1, $2, $3, $4, $5)
           RETURNING id, external_id, name, email, currency, created_at"#,
        id.as_uuid(),
        external_id,
        name,
        email,
        currency,
    )
    .fetch_one(db)
    .await
}

/// Returns the customer, or `None` when there is none.
pub async fn get_customer(
    db: impl PgExecutor<'_>,
    id: CustomerId,
) -> sqlx::Result<Option<CustomerRow>> {
    sqlx::query_as!(
        CustomerRow,
        r#"SELECT id, external_id, name, email, currency, created_at FROM customers WHERE id = $1"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Returns the customer with this external id, or `None` when there is none.
pub async fn get_customer_by_external_id(
    db: impl PgExecutor<'_>,
    external_id: &str,
) -> sqlx::Result<Option<CustomerRow>> {
    sqlx::query_as!(
        CustomerRow,
        r#"SELECT id, external_id, name, email, currency, created_at FROM customers WHERE external_id = $1"#,
        external_id,
    )
    .fetch_optional(db)
    .await
}

/// Returns the customer locked for the rest of the transaction, which serialises every change to one
/// customer's subscriptions and balance; `None` when there is none.
pub async fn lock_customer(
    db: impl PgExecutor<'_>,
    id: CustomerId,
) -> sqlx::Result<Option<CustomerRow>> {
    sqlx::query_as!(
        CustomerRow,
        r#"SELECT id, external_id, name, email, currency, created_at FROM customers WHERE id = $1 FOR UPDATE"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Returns up to `limit` customers with ids greater than `after`, in id (= creation) order.
pub async fn list_customers(
    db: impl PgExecutor<'_>,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<CustomerRow>> {
    sqlx::query_as!(
        CustomerRow,
        r#"SELECT id, external_id, name, email, currency, created_at FROM customers
           WHERE $1::uuid IS NULL OR id > $1
           ORDER BY id
           LIMIT $2"#,
        after,
        limit,
    )
    .fetch_all(db)
    .await
}

/// A plan as stored.
#[derive(Debug, Clone)]
pub struct PlanRow {
    pub id: Uuid,
    pub code: String,
    pub name: String,
    pub currency: String,
    pub price_micros: i64,
    pub billing_interval: String,
    pub included_units: i64,
    pub rate_limit: i32,
    pub rate_period_ms: i32,
    pub burst: i32,
    pub overage_mode: String,
    pub unit_price_micros: i64,
    pub grace_period_seconds: i32,
    pub trial_days: i32,
    pub features: Vec<String>,
    pub archived_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

/// Inserts `plan` (its `archived_at` and `created_at` are ignored); fails with a unique violation on
/// `plans_code_key` when the code is taken.
pub async fn insert_plan(db: impl PgExecutor<'_>, plan: &PlanRow) -> sqlx::Result<PlanRow> {
    sqlx::query_as!(
        PlanRow,
        r#"INSERT INTO plans (id, code, name, currency, price_micros, billing_interval, included_units,
                              rate_limit, rate_period_ms, burst, overage_mode, unit_price_micros,
                              grace_period_seconds, trial_days, features)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
           RETURNING id, code, name, currency, price_micros, billing_interval, included_units, rate_limit,
                     rate_period_ms, burst, overage_mode, unit_price_micros, grace_period_seconds, trial_days,
                     features, archived_at, created_at"#,
        plan.id,
        plan.code,
        plan.name,
        plan.currency,
        plan.price_micros,
        plan.billing_interval,
        plan.included_units,
        plan.rate_limit,
        plan.rate_period_ms,
        plan.burst,
        plan.overage_mode,
        plan.unit_price_micros,
        plan.grace_period_seconds,
        plan.trial_days,
        &plan.features,
    )
    .fetch_one(db)
    .await
}

/// Returns the plan, or `None` when there is none.
pub async fn get_plan(db: impl PgExecutor<'_>, id: PlanId) -> sqlx::Result<Option<PlanRow>> {
    sqlx::query_as!(
        PlanRow,
        r#"SELECT id, code, name, currency, price_micros, billing_interval, included_units, rate_limit,
                  rate_period_ms, burst, overage_mode, unit_price_micros, grace_period_seconds, trial_days,
                  features, archived_at, created_at
           FROM plans WHERE id = $1"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Returns all plans in creation order, archived ones only when asked for.
pub async fn list_plans(
    db: impl PgExecutor<'_>,
    include_archived: bool,
) -> sqlx::Result<Vec<PlanRow>> {
    sqlx::query_as!(
        PlanRow,
        r#"SELECT id, code, name, currency, price_micros, billing_interval, included_units, rate_limit,
                  rate_period_ms, burst, overage_mode, unit_price_micros, grace_period_seconds, trial_days,
                  features, archived_at, created_at
           FROM plans WHERE $1 OR archived_at IS NULL
           ORDER BY id"#,
        include_archived,
    )
    .fetch_all(db)
    .await
}

/// Archives the plan at `now` unless it already is; `None` when there is no such plan.
pub async fn archive_plan(
    db: impl PgExecutor<'_>,
    id: PlanId,
    now: OffsetDateTime,
) -> sqlx::Result<Option<PlanRow>> {
    sqlx::query_as!(
        PlanRow,
        r#"UPDATE plans SET archived_at = COALESCE(archived_at, $2) WHERE id = $1
           RETURNING id, code, name, currency, price_micros, billing_interval, included_units, rate_limit,
                     rate_period_ms, burst, overage_mode, unit_price_micros, grace_period_seconds, trial_days,
                     features, archived_at, created_at"#,
        id.as_uuid(),
        now,
    )
    .fetch_optional(db)
    .await
}

/// A subscription as stored, with the plan terms its status depends on.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub plan_id: Uuid,
    pub started_at: OffsetDateTime,
    pub anchor: OffsetDateTime,
    pub trial_ends_at: Option<OffsetDateTime>,
    pub paid_through: OffsetDateTime,
    pub last_payment_at: Option<OffsetDateTime>,
    pub payment_failed_at: Option<OffsetDateTime>,
    pub cancel_at: Option<OffsetDateTime>,
    pub ended_at: Option<OffsetDateTime>,
    pub end_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub plan_code: String,
    pub plan_price_micros: i64,
    pub plan_interval: String,
    pub plan_grace_period_seconds: i32,
}

/// The stored facts of a new subscription.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub id: SubscriptionId,
    pub customer_id: CustomerId,
    pub plan_id: PlanId,
    pub started_at: OffsetDateTime,
    pub anchor: OffsetDateTime,
    pub trial_ends_at: Option<OffsetDateTime>,
    pub paid_through: OffsetDateTime,
}

/// Inserts a live subscription; fails with a unique violation on `subscriptions_one_live_per_customer`
/// when the customer already has one.
pub async fn insert_subscription(
    db: impl PgExecutor<'_>,
    new: &NewSubscription,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"INSERT INTO subscriptions (id, customer_id, plan_id, started_at, anchor, trial_ends_at, paid_through)
           VALUES ($1, $2, $3, $4, $5, $6, $7)"#,
        new.id.as_uuid(),
        new.customer_id.as_uuid(),
        new.plan_id.as_uuid(),
        new.started_at,
        new.anchor,
        new.trial_ends_at,
        new.paid_through,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Returns the subscription, or `None` when there is none.
pub async fn get_subscription(
    db: impl PgExecutor<'_>,
    id: SubscriptionId,
) -> sqlx::Result<Option<SubscriptionRow>> {
    sqlx::query_as!(
        SubscriptionRow,
        r#"SELECT s.id, s.customer_id, s.plan_id, s.started_at, s.anchor, s.trial_ends_at, s.paid_through,
                  s.last_payment_at, s.payment_failed_at, s.cancel_at, s.ended_at, s.end_reason, s.created_at,
                  p.code AS plan_code, p.price_micros AS plan_price_micros,
                  p.billing_interval AS plan_interval, p.grace_period_seconds AS plan_grace_period_seconds
           FROM subscriptions s JOIN plans p ON p.id = s.plan_id
           WHERE s.id = $1"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Returns the subscription locked for the rest of the transaction; `None` when there is none.
pub async fn lock_subscription(
    db: impl PgExecutor<'_>,
    id: SubscriptionId,
) -> sqlx::Result<Option<SubscriptionRow>> {
    sqlx::query_as!(
        SubscriptionRow,
        r#"SELECT s.id, s.customer_id, s.plan_id, s.started_at, s.anchor, s.trial_ends_at, s.paid_through,
                  s.last_payment_at, s.payment_failed_at, s.cancel_at, s.ended_at, s.end_reason, s.created_at,
                  p.code AS plan_code, p.price_micros AS plan_price_micros,
                  p.billing_interval AS plan_interval, p.grace_period_seconds AS plan_grace_period_seconds
           FROM subscriptions s JOIN plans p ON p.id = s.plan_id
           WHERE s.id = $1
           FOR UPDATE OF s"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Returns the customer's subscription not yet marked ended (it may have ended by the passage of time),
/// or else their most recent one; `None` when they never had one.
pub async fn current_subscription(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
) -> sqlx::Result<Option<SubscriptionRow>> {
    sqlx::query_as!(
        SubscriptionRow,
        r#"SELECT s.id, s.customer_id, s.plan_id, s.started_at, s.anchor, s.trial_ends_at, s.paid_through,
                  s.last_payment_at, s.payment_failed_at, s.cancel_at, s.ended_at, s.end_reason, s.created_at,
                  p.code AS plan_code, p.price_micros AS plan_price_micros,
                  p.billing_interval AS plan_interval, p.grace_period_seconds AS plan_grace_period_seconds
           FROM subscriptions s JOIN plans p ON p.id = s.plan_id
           WHERE s.customer_id = $1
           ORDER BY s.ended_at IS NULL DESC, s.id DESC
           LIMIT 1"#,
        customer.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Records that a subscription ended at `ended_at` for `reason` (`canceled` or `expired`).
pub async fn mark_subscription_ended(
    db: impl PgExecutor<'_>,
    id: Uuid,
    ended_at: OffsetDateTime,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE subscriptions SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL"#,
        id,
        ended_at,
        reason,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Moves a subscription to another plan.
pub async fn set_subscription_plan(
    db: impl PgExecutor<'_>,
    id: Uuid,
    plan: PlanId,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE subscriptions SET plan_id = $2 WHERE id = $1"#,
        id,
        plan.as_uuid(),
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Schedules the subscription's cancellation at `cancel_at`.
pub async fn set_cancel_at(
    db: impl PgExecutor<'_>,
    id: Uuid,
    cancel_at: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE subscriptions SET cancel_at = $2 WHERE id = $1"#,
        id,
        cancel_at,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records a successful renewal payment: the new paid-through instant and anchor, past due cleared.
pub async fn record_renewal(
    db: impl PgExecutor<'_>,
    id: Uuid,
    paid_through: OffsetDateTime,
    anchor: OffsetDateTime,
    now: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE subscriptions
           SET paid_through = $2, anchor = $3, last_payment_at = $4, payment_failed_at = NULL
           WHERE id = $1"#,
        id,
        paid_through,
        anchor,
        now,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records a failed renewal payment; an earlier failure that is still uncleared keeps its instant.
pub async fn record_failed_renewal(
    db: impl PgExecutor<'_>,
    id: Uuid,
    now: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE subscriptions SET payment_failed_at = COALESCE(payment_failed_at, $2) WHERE id = $1"#,
        id,
        now,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// A payment as stored.
#[derive(Debug, Clone)]
pub struct PaymentRow {
    pub id: Uuid,
    pub idempotency_key: String,
    pub request_digest: Vec<u8>,
    pub customer_id: Uuid,
    pub subscription_id: Option<Uuid>,
    pub purpose: String,
    pub outcome: String,
    pub amount_micros: i64,
    pub currency: String,
    pub provider_reference: String,
    pub failure_reason: String,
    pub ledger_entry_id: Option<i64>,
    pub paid_through: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

/// Inserts a payment unless its idempotency key is taken; `true` when inserted. A concurrent insert with
/// the same key waits for the first transaction and then inserts nothing.
pub async fn insert_payment(db: impl PgExecutor<'_>, payment: &PaymentRow) -> sqlx::Result<bool> {
    let inserted = sqlx::query!(
        r#"INSERT INTO payments (id, idempotency_key, request_digest, customer_id, subscription_id, purpose,
                                 outcome, amount_micros, currency, provider_reference, failure_reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
           ON CONFLICT (idempotency_key) DO NOTHING"#,
        payment.id,
        payment.idempotency_key,
        payment.request_digest,
        payment.customer_id,
        payment.subscription_id,
        payment.purpose,
        payment.outcome,
        payment.amount_micros,
        payment.currency,
        payment.provider_reference,
        payment.failure_reason,
    )
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Returns the payment recorded under `key`, or `None`.
pub async fn get_payment_by_key(
    db: impl PgExecutor<'_>,
    key: &str,
) -> sqlx::Result<Option<PaymentRow>> {
    sqlx::query_as!(
        PaymentRow,
        r#"SELECT id, idempotency_key, request_digest, customer_id, subscription_id, purpose, outcome,
                  amount_micros, currency, provider_reference, failure_reason, ledger_entry_id, paid_through,
                  created_at
           FROM payments WHERE idempotency_key = $1"#,
        key,
    )
    .fetch_optional(db)
    .await
}

/// Stores what a payment did (its subscription, ledger entry, new paid-through), so a retry returns it.
pub async fn set_payment_effects(
    db: impl PgExecutor<'_>,
    id: Uuid,
    subscription_id: Option<Uuid>,
    ledger_entry_id: Option<i64>,
    paid_through: Option<OffsetDateTime>,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"UPDATE payments SET subscription_id = $2, ledger_entry_id = $3, paid_through = $4 WHERE id = $1"#,
        id,
        subscription_id,
        ledger_entry_id,
        paid_through,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// One row of the credit ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub id: i64,
    pub customer_id: Uuid,
    pub kind: String,
    pub delta_micros: i64,
    pub reference: String,
    pub note: String,
    pub created_at: OffsetDateTime,
}

/// Appends a ledger entry; `None` if an entry with this reference already exists, in which case nothing
/// changes.
pub async fn append_ledger_entry(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
    kind: &str,
    delta_micros: i64,
    reference: &str,
    note: &str,
) -> sqlx::Result<Option<LedgerRow>> {
    let appended = sqlx::query_as!(
        LedgerRow,
        r#"INSERT INTO credit_ledger (customer_id, kind, delta_micros, reference, note)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (reference) DO NOTHING
           RETURNING id, customer_id, kind, delta_micros, reference, note, created_at"#,
        customer.as_uuid(),
        kind,
        delta_micros,
        reference,
        note,
    )
    .fetch_optional(db)
    .await?;
    if appended.is_some() {
        // Counted when the row is written; a transaction that then rolls back (rare) is counted too.
        metrics::counter!("paygate_billing_ledger_writes_total", "kind" => kind.to_owned())
            .increment(1);
    }
    Ok(appended)
}

/// Returns the ledger entry with `reference`, or `None`.
pub async fn get_ledger_entry_by_reference(
    db: impl PgExecutor<'_>,
    reference: &str,
) -> sqlx::Result<Option<LedgerRow>> {
    sqlx::query_as!(
        LedgerRow,
        r#"SELECT id, customer_id, kind, delta_micros, reference, note, created_at
           FROM credit_ledger WHERE reference = $1"#,
        reference,
    )
    .fetch_optional(db)
    .await
}

/// Returns the customer's balance: the sum of their ledger entries (0 when they have none).
pub async fn credit_balance(db: impl PgExecutor<'_>, customer: CustomerId) -> sqlx::Result<i64> {
    let balance = sqlx::query_scalar!(
        r#"SELECT COALESCE(SUM(delta_micros), 0)::bigint AS "balance!" FROM credit_ledger WHERE customer_id = $1"#,
        customer.as_uuid(),
    )
    .fetch_one(db)
    .await?;
    Ok(balance)
}

/// Returns up to `limit` of the customer's ledger entries with ids greater than `after`, oldest first.
pub async fn list_ledger_entries(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<LedgerRow>> {
    sqlx::query_as!(
        LedgerRow,
        r#"SELECT id, customer_id, kind, delta_micros, reference, note, created_at
           FROM credit_ledger WHERE customer_id = $1 AND id > $2
           ORDER BY id
           LIMIT $3"#,
        customer.as_uuid(),
        after,
        limit,
    )
    .fetch_all(db)
    .await
}

/// An API key as stored (never its secret).
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub digest: Vec<u8>,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub replaces_key_id: Option<Uuid>,
    pub created_at: OffsetDateTime,
}

/// Inserts a key by its digest and display prefix.
pub async fn insert_key(
    db: impl PgExecutor<'_>,
    id: KeyId,
    customer: CustomerId,
    name: &str,
    prefix: &str,
    digest: &[u8],
    replaces: Option<Uuid>,
) -> sqlx::Result<KeyRow> {
    sqlx::query_as!(
        KeyRow,
        r#"INSERT INTO api_keys (id, customer_id, name, prefix, digest, replaces_key_id)
           VALUES ($1, $2, $3, $4, $5, $6)
           RETURNING id, customer_id, name, prefix, digest, expires_at, revoked_at, replaces_key_id, created_at"#,
        id.as_uuid(),
        customer.as_uuid(),
        name,
        prefix,
        digest,
        replaces,
    )
    .fetch_one(db)
    .await
}

/// Returns the customer's keys, newest first.
pub async fn list_keys(db: impl PgExecutor<'_>, customer: CustomerId) -> sqlx::Result<Vec<KeyRow>> {
    sqlx::query_as!(
        KeyRow,
        r#"SELECT id, customer_id, name, prefix, digest, expires_at, revoked_at, replaces_key_id, created_at
           FROM api_keys WHERE customer_id = $1
           ORDER BY id DESC"#,
        customer.as_uuid(),
    )
    .fetch_all(db)
    .await
}

/// Returns the key locked for the rest of the transaction; `None` when there is none.
pub async fn lock_key(db: impl PgExecutor<'_>, id: KeyId) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as!(
        KeyRow,
        r#"SELECT id, customer_id, name, prefix, digest, expires_at, revoked_at, replaces_key_id, created_at
           FROM api_keys WHERE id = $1 FOR UPDATE"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Revokes the key at `now` (an earlier revocation keeps its instant) and returns it.
pub async fn revoke_key(
    db: impl PgExecutor<'_>,
    id: Uuid,
    now: OffsetDateTime,
) -> sqlx::Result<KeyRow> {
    sqlx::query_as!(
        KeyRow,
        r#"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1
           RETURNING id, customer_id, name, prefix, digest, expires_at, revoked_at, replaces_key_id, created_at"#,
        id,
        now,
    )
    .fetch_one(db)
    .await
}

/// Makes the key stop working at `expires_at` (an earlier expiry is kept) and returns it.
pub async fn expire_key(
    db: impl PgExecutor<'_>,
    id: Uuid,
    expires_at: OffsetDateTime,
) -> sqlx::Result<KeyRow> {
    sqlx::query_as!(
        KeyRow,
        r#"UPDATE api_keys SET expires_at = LEAST(COALESCE(expires_at, $2), $2) WHERE id = $1
           RETURNING id, customer_id, name, prefix, digest, expires_at, revoked_at, replaces_key_id, created_at"#,
        id,
        expires_at,
    )
    .fetch_one(db)
    .await
}

/// A usable key with what the entitlement needs about its customer.
#[derive(Debug, Clone)]
pub struct ResolvedKey {
    pub key_id: Uuid,
    pub customer_id: Uuid,
    pub external_id: String,
    pub currency: String,
    pub expires_at: Option<OffsetDateTime>,
}

/// Everything `Resolve` answers from: a usable key, its customer, and the customer's current subscription
/// (the live one, else the latest ended one) with its plan.
#[derive(Debug, Clone)]
pub struct ResolvedEntitlement {
    pub key: ResolvedKey,
    pub subscription: Option<(SubscriptionRow, PlanRow)>,
}

/// The flat row of `resolve_entitlement`'s one statement; the subscription's and plan's columns are all
/// `None` when the customer has no subscription.
struct ResolvedRow {
    key_id: Uuid,
    customer_id: Uuid,
    external_id: String,
    currency: String,
    expires_at: Option<OffsetDateTime>,
    subscription_id: Option<Uuid>,
    started_at: Option<OffsetDateTime>,
    anchor: Option<OffsetDateTime>,
    trial_ends_at: Option<OffsetDateTime>,
    paid_through: Option<OffsetDateTime>,
    last_payment_at: Option<OffsetDateTime>,
    payment_failed_at: Option<OffsetDateTime>,
    cancel_at: Option<OffsetDateTime>,
    ended_at: Option<OffsetDateTime>,
    end_reason: Option<String>,
    subscription_created_at: Option<OffsetDateTime>,
    plan_id: Option<Uuid>,
    plan_code: Option<String>,
    plan_name: Option<String>,
    plan_currency: Option<String>,
    plan_price_micros: Option<i64>,
    plan_interval: Option<String>,
    plan_included_units: Option<i64>,
    plan_rate_limit: Option<i32>,
    plan_rate_period_ms: Option<i32>,
    plan_burst: Option<i32>,
    plan_overage_mode: Option<String>,
    plan_unit_price_micros: Option<i64>,
    plan_grace_period_seconds: Option<i32>,
    plan_trial_days: Option<i32>,
    plan_features: Option<Vec<String>>,
    plan_archived_at: Option<OffsetDateTime>,
    plan_created_at: Option<OffsetDateTime>,
}

impl ResolvedRow {
    fn into_entitlement(self) -> ResolvedEntitlement {
        let subscription = (|| {
            let plan = PlanRow {
                id: self.plan_id?,
                code: self.plan_code?,
                name: self.plan_name?,
                currency: self.plan_currency?,
                price_micros: self.plan_price_micros?,
                billing_interval: self.plan_interval?,
                included_units: self.plan_included_units?,
                rate_limit: self.plan_rate_limit?,
                rate_period_ms: self.plan_rate_period_ms?,
                burst: self.plan_burst?,
                overage_mode: self.plan_overage_mode?,
                unit_price_micros: self.plan_unit_price_micros?,
                grace_period_seconds: self.plan_grace_period_seconds?,
                trial_days: self.plan_trial_days?,
                features: self.plan_features?,
                archived_at: self.plan_archived_at,
                created_at: self.plan_created_at?,
            };
            let subscription = SubscriptionRow {
                id: self.subscription_id?,
                customer_id: self.customer_id,
                plan_id: plan.id,
                started_at: self.started_at?,
                anchor: self.anchor?,
                trial_ends_at: self.trial_ends_at,
                paid_through: self.paid_through?,
                last_payment_at: self.last_payment_at,
                payment_failed_at: self.payment_failed_at,
                cancel_at: self.cancel_at,
                ended_at: self.ended_at,
                end_reason: self.end_reason,
                created_at: self.subscription_created_at?,
                plan_code: plan.code.clone(),
                plan_price_micros: plan.price_micros,
                plan_interval: plan.billing_interval.clone(),
                plan_grace_period_seconds: plan.grace_period_seconds,
            };
            Some((subscription, plan))
        })();
        ResolvedEntitlement {
            key: ResolvedKey {
                key_id: self.key_id,
                customer_id: self.customer_id,
                external_id: self.external_id,
                currency: self.currency,
                expires_at: self.expires_at,
            },
            subscription,
        }
    }
}

/// Returns the key with this digest if it is usable at `now` (not revoked, not expired), with its
/// customer's current subscription and plan; `None` otherwise, without telling which.
///
/// One statement, so one pool connection and one round trip per `Resolve`: with a statement each for key,
/// subscription and plan, a storm of cold keys queued three times for the pool per call and paid three
/// round trips, and its slowest calls outlasted the gateway's deadline (bench/README.md, `bench/faults`).
/// The subscription is the one `current_subscription` returns.
pub async fn resolve_entitlement(
    db: impl PgExecutor<'_>,
    digest: &[u8],
    now: OffsetDateTime,
) -> sqlx::Result<Option<ResolvedEntitlement>> {
    let row = sqlx::query_as!(
        ResolvedRow,
        r#"SELECT k.id AS key_id, k.customer_id, c.external_id, c.currency, k.expires_at,
                  s.id AS "subscription_id?", s.started_at AS "started_at?", s.anchor AS "anchor?",
                  s.trial_ends_at, s.paid_through AS "paid_through?", s.last_payment_at,
                  s.payment_failed_at, s.cancel_at, s.ended_at, s.end_reason,
                  s.created_at AS "subscription_created_at?",
                  p.id AS "plan_id?", p.code AS "plan_code?", p.name AS "plan_name?",
                  p.currency AS "plan_currency?", p.price_micros AS "plan_price_micros?",
                  p.billing_interval AS "plan_interval?", p.included_units AS "plan_included_units?",
                  p.rate_limit AS "plan_rate_limit?", p.rate_period_ms AS "plan_rate_period_ms?",
                  p.burst AS "plan_burst?", p.overage_mode AS "plan_overage_mode?",
                  p.unit_price_micros AS "plan_unit_price_micros?",
                  p.grace_period_seconds AS "plan_grace_period_seconds?",
                  p.trial_days AS "plan_trial_days?", p.features AS "plan_features?",
                  p.archived_at AS plan_archived_at, p.created_at AS "plan_created_at?"
           FROM api_keys k
           JOIN customers c ON c.id = k.customer_id
           LEFT JOIN LATERAL (
               SELECT * FROM subscriptions
               WHERE customer_id = k.customer_id
               ORDER BY ended_at IS NULL DESC, id DESC
               LIMIT 1
           ) s ON true
           LEFT JOIN plans p ON p.id = s.plan_id
           WHERE k.digest = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2)"#,
        digest,
        now,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(ResolvedRow::into_entitlement))
}

/// Records a usage report id with the digest of its contents; `true` when new.
pub async fn insert_usage_report(
    db: impl PgExecutor<'_>,
    report_id: &str,
    digest: &[u8],
) -> sqlx::Result<bool> {
    let inserted = sqlx::query!(
        r#"INSERT INTO usage_reports (report_id, request_digest) VALUES ($1, $2)
           ON CONFLICT (report_id) DO NOTHING"#,
        report_id,
        digest,
    )
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Records that a usage entry is applied as part of `report_id`; `false` when it had been applied before.
pub async fn insert_usage_entry(
    db: impl PgExecutor<'_>,
    entry_id: &str,
    report_id: &str,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query!(
        r#"INSERT INTO usage_entries (entry_id, report_id) VALUES ($1, $2)
           ON CONFLICT (entry_id) DO NOTHING"#,
        entry_id,
        report_id,
    )
    .execute(db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Records `sequence` as the customer's last applied usage outbox if it is greater than the one recorded;
/// `false` (nothing changes) when it is not, i.e. that outbox, or a later one, was applied before.
pub async fn advance_usage_outbox_sequence(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
    sequence: i64,
) -> sqlx::Result<bool> {
    let advanced = sqlx::query!(
        r#"INSERT INTO usage_outbox_sequences AS current (customer_id, outbox_sequence) VALUES ($1, $2)
           ON CONFLICT (customer_id) DO UPDATE SET outbox_sequence = EXCLUDED.outbox_sequence, updated_at = now()
           WHERE current.outbox_sequence < EXCLUDED.outbox_sequence"#,
        customer.as_uuid(),
        sequence,
    )
    .execute(db)
    .await?;
    Ok(advanced.rows_affected() == 1)
}

/// Returns the customer's last applied usage outbox sequence (0 when none was numbered).
pub async fn usage_outbox_sequence(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
) -> sqlx::Result<i64> {
    let sequence = sqlx::query_scalar!(
        r#"SELECT outbox_sequence FROM usage_outbox_sequences WHERE customer_id = $1"#,
        customer.as_uuid(),
    )
    .fetch_optional(db)
    .await?;
    Ok(sequence.unwrap_or(0))
}

/// Returns the last applied usage outbox sequence of each of `customers` that has one.
pub async fn usage_outbox_sequences(
    db: impl PgExecutor<'_>,
    customers: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT customer_id, outbox_sequence FROM usage_outbox_sequences WHERE customer_id = ANY($1)"#,
        customers,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.customer_id, row.outbox_sequence))
        .collect())
}

/// Returns the content digest of an applied usage report, or `None` when the id is new.
pub async fn usage_report_digest(
    db: impl PgExecutor<'_>,
    report_id: &str,
) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar!(
        r#"SELECT request_digest FROM usage_reports WHERE report_id = $1"#,
        report_id,
    )
    .fetch_optional(db)
    .await
}

/// Returns the customer a subscription belongs to, or `None` when there is no such subscription.
pub async fn subscription_owner(
    db: impl PgExecutor<'_>,
    id: SubscriptionId,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar!(
        r#"SELECT customer_id FROM subscriptions WHERE id = $1"#,
        id.as_uuid(),
    )
    .fetch_optional(db)
    .await
}

/// Adds net units and credits to a subscription period's totals.
pub async fn add_usage_totals(
    db: impl PgExecutor<'_>,
    subscription: SubscriptionId,
    period_start: OffsetDateTime,
    units: i64,
    credits_micros: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"INSERT INTO usage_totals (subscription_id, period_start, units, credits_micros)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (subscription_id, period_start) DO UPDATE
           SET units = usage_totals.units + EXCLUDED.units,
               credits_micros = usage_totals.credits_micros + EXCLUDED.credits_micros,
               updated_at = now()"#,
        subscription.as_uuid(),
        period_start,
        units,
        credits_micros,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Usage totals of one subscription period.
#[derive(Debug, Clone)]
pub struct PeriodUsageRow {
    pub subscription_id: Uuid,
    pub period_start: OffsetDateTime,
    pub units: i64,
    pub credits_micros: i64,
}

/// Returns the customer's most recent `limit` periods with reported usage, newest first.
pub async fn list_period_usage(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
    limit: i64,
) -> sqlx::Result<Vec<PeriodUsageRow>> {
    sqlx::query_as!(
        PeriodUsageRow,
        r#"SELECT u.subscription_id, u.period_start, u.units, u.credits_micros
           FROM usage_totals u JOIN subscriptions s ON s.id = u.subscription_id
           WHERE s.customer_id = $1
           ORDER BY u.period_start DESC, u.subscription_id
           LIMIT $2"#,
        customer.as_uuid(),
        limit,
    )
    .fetch_all(db)
    .await
}

/// An audit event as stored.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: Uuid,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub details: serde_json::Value,
    pub created_at: OffsetDateTime,
}

/// Appends an audit event.
pub async fn insert_audit_event(
    db: impl PgExecutor<'_>,
    actor: &str,
    action: &str,
    target_type: &str,
    target_id: &str,
    details: &serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"INSERT INTO audit_events (id, actor, action, target_type, target_id, details)
           VALUES ($1, $2, $3, $4, $5, $6)"#,
        Uuid::now_v7(),
        actor,
        action,
        target_type,
        target_id,
        details,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Returns up to `limit` audit events with ids below `before`, newest first, optionally about one target.
pub async fn list_audit_events(
    db: impl PgExecutor<'_>,
    target_id: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as!(
        AuditRow,
        r#"SELECT id, actor, action, target_type, target_id, details, created_at
           FROM audit_events
           WHERE ($1::text IS NULL OR target_id = $1) AND ($2::uuid IS NULL OR id < $2)
           ORDER BY id DESC
           LIMIT $3"#,
        target_id,
        before,
        limit,
    )
    .fetch_all(db)
    .await
}

/// A change to an entitlement or balance, as published on the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Key {
        customer: Uuid,
        digest: Vec<u8>,
    },
    Customer {
        customer: Uuid,
    },
    Credits {
        customer: Uuid,
        reference: String,
        delta_micros: i64,
    },
}

/// One row of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    pub sequence: i64,
    pub kind: String,
    pub customer_id: Uuid,
    pub key_digest: Option<Vec<u8>>,
    pub reference: Option<String>,
    pub delta_micros: Option<i64>,
}

/// The PostgreSQL channel that wakes billing replicas when the change feed grows.
pub const CHANGES_CHANNEL: &str = "paygate_changes";

/// Appends `change` to the feed and notifies every replica at commit. Call it last in a transaction: it
/// takes a lock held until commit, so that sequences become visible in order and readers never skip one.
pub async fn publish_change(conn: &mut sqlx::PgConnection, change: &Change) -> sqlx::Result<i64> {
    // The key is arbitrary but fixed; it names the change feed among advisory locks.
    sqlx::query!(r#"SELECT pg_advisory_xact_lock(7261122001)"#)
        .execute(&mut *conn)
        .await?;
    let (kind, customer, digest, reference, delta) = match change {
        Change::Key { customer, digest } => ("key", *customer, Some(digest.as_slice()), None, None),
        Change::Customer { customer } => ("customer", *customer, None, None, None),
        Change::Credits {
            customer,
            reference,
            delta_micros,
        } => (
            "credits",
            *customer,
            None,
            Some(reference.as_str()),
            Some(*delta_micros),
        ),
    };
    let sequence = sqlx::query_scalar!(
        r#"INSERT INTO change_events (kind, customer_id, key_digest, reference, delta_micros)
           VALUES ($1, $2, $3, $4, $5)
           RETURNING sequence"#,
        kind,
        customer,
        digest,
        reference,
        delta,
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query!(
        r#"SELECT pg_notify($1, $2::bigint::text)"#,
        CHANGES_CHANNEL,
        sequence,
    )
    .execute(&mut *conn)
    .await?;
    Ok(sequence)
}

/// Returns up to `limit` feed rows after `after`, in sequence order.
pub async fn changes_after(
    db: impl PgExecutor<'_>,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<ChangeRow>> {
    sqlx::query_as!(
        ChangeRow,
        r#"SELECT sequence, kind, customer_id, key_digest, reference, delta_micros
           FROM change_events WHERE sequence > $1
           ORDER BY sequence
           LIMIT $2"#,
        after,
        limit,
    )
    .fetch_all(db)
    .await
}

/// Returns the latest published sequence, and the oldest one still retained (0 and 0 for an empty feed).
pub async fn change_feed_bounds(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, i64)> {
    let bounds = sqlx::query!(
        r#"SELECT COALESCE(MAX(sequence), 0)::bigint AS "latest!", COALESCE(MIN(sequence), 0)::bigint AS "oldest!"
           FROM change_events"#
    )
    .fetch_one(db)
    .await?;
    Ok((bounds.latest, bounds.oldest))
}

/// Deletes feed rows older than `before`, keeping the newest row so the latest sequence stays known.
pub async fn prune_changes(db: impl PgExecutor<'_>, before: OffsetDateTime) -> sqlx::Result<u64> {
    let deleted = sqlx::query!(
        r#"DELETE FROM change_events
           WHERE created_at < $1 AND sequence < (SELECT MAX(sequence) FROM change_events)"#,
        before,
    )
    .execute(db)
    .await?;
    Ok(deleted.rows_affected())
}

/// One customer's statistics for one UTC hour (see the `customer_hourly_stats` migration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourStatsRow {
    pub customer_id: Uuid,
    pub hour: OffsetDateTime,
    pub admitted: i64,
    pub upstream_2xx: i64,
    pub upstream_4xx: i64,
    pub upstream_5xx: i64,
    pub upstream_other: i64,
    pub answered: Vec<i64>,
    pub units: i64,
    pub credits_micros: i64,
    pub upstream_latency_sum_us: i64,
    pub upstream_latency_buckets: Vec<i64>,
}

/// Notes that the statistics report `report_id` is being applied; `false` if it was applied before (then
/// nothing else of it may be applied).
pub async fn claim_stats_report(db: impl PgExecutor<'_>, report_id: &str) -> sqlx::Result<bool> {
    let claimed = sqlx::query!(
        r#"INSERT INTO stats_reports (report_id) VALUES ($1) ON CONFLICT (report_id) DO NOTHING"#,
        report_id,
    )
    .execute(db)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Adds `row` to its customer's hour, creating the hour when it is the first report of it. Arrays are
/// added position by position; a shorter one counts as zeros where it ends.
pub async fn add_hour_stats(db: impl PgExecutor<'_>, row: &HourStatsRow) -> sqlx::Result<()> {
    sqlx::query!(
        r#"INSERT INTO customer_hourly_stats (customer_id, hour, admitted, upstream_2xx, upstream_4xx,
               upstream_5xx, upstream_other, answered, units, credits_micros, upstream_latency_sum_us,
               upstream_latency_buckets)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
           ON CONFLICT (customer_id, hour) DO UPDATE SET
               admitted = customer_hourly_stats.admitted + EXCLUDED.admitted,
               upstream_2xx = customer_hourly_stats.upstream_2xx + EXCLUDED.upstream_2xx,
               upstream_4xx = customer_hourly_stats.upstream_4xx + EXCLUDED.upstream_4xx,
               upstream_5xx = customer_hourly_stats.upstream_5xx + EXCLUDED.upstream_5xx,
               upstream_other = customer_hourly_stats.upstream_other + EXCLUDED.upstream_other,
               answered = ARRAY(
                   SELECT COALESCE(stored, 0) + COALESCE(added, 0)
                   FROM unnest(customer_hourly_stats.answered, EXCLUDED.answered)
                        WITH ORDINALITY AS counts (stored, added, position)
                   ORDER BY position),
               units = customer_hourly_stats.units + EXCLUDED.units,
               credits_micros = customer_hourly_stats.credits_micros + EXCLUDED.credits_micros,
               upstream_latency_sum_us =
                   customer_hourly_stats.upstream_latency_sum_us + EXCLUDED.upstream_latency_sum_us,
               upstream_latency_buckets = ARRAY(
                   SELECT COALESCE(stored, 0) + COALESCE(added, 0)
                   FROM unnest(customer_hourly_stats.upstream_latency_buckets,
                               EXCLUDED.upstream_latency_buckets)
                        WITH ORDINALITY AS counts (stored, added, position)
                   ORDER BY position),
               updated_at = now()"#,
        row.customer_id,
        row.hour,
        row.admitted,
        row.upstream_2xx,
        row.upstream_4xx,
        row.upstream_5xx,
        row.upstream_other,
        &row.answered,
        row.units,
        row.credits_micros,
        row.upstream_latency_sum_us,
        &row.upstream_latency_buckets,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Returns `customer`'s hours in [`from`, `to`), oldest first.
pub async fn list_hour_stats(
    db: impl PgExecutor<'_>,
    customer: CustomerId,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> sqlx::Result<Vec<HourStatsRow>> {
    sqlx::query_as!(
        HourStatsRow,
        r#"SELECT customer_id, hour, admitted, upstream_2xx, upstream_4xx, upstream_5xx, upstream_other,
                  answered, units, credits_micros, upstream_latency_sum_us, upstream_latency_buckets
           FROM customer_hourly_stats
           WHERE customer_id = $1 AND hour >= $2 AND hour < $3
           ORDER BY hour"#,
        customer.as_uuid(),
        from,
        to,
    )
    .fetch_all(db)
    .await
}
