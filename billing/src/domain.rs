//! Newtypes, validation and the pure rules of billing: periods, subscription status over time, renewal and
//! API-key minting. Nothing here does I/O.

use std::fmt;

use sha2::{Digest, Sha256};
use time::{Date, Duration, OffsetDateTime};
use uuid::Uuid;

use crate::error::BillingError;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// Mints a new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Parses the id as sent by a client; `InvalidArgument` naming the field when it is not a UUID.
            pub fn parse(text: &str) -> Result<Self, BillingError> {
                Uuid::parse_str(text)
                    .map(Self)
                    .map_err(|_| BillingError::InvalidArgument(format!("`{}` must be a UUID", $field)))
            }

            /// Returns the underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(formatter)
            }
        }
    };
}

id_type!(
    /// Identifies a customer.
    CustomerId,
    "customer_id"
);
id_type!(
    /// Identifies a plan.
    PlanId,
    "plan_id"
);
id_type!(
    /// Identifies a subscription.
    SubscriptionId,
    "subscription_id"
);
id_type!(
    /// Identifies an API key (not its secret).
    KeyId,
    "key_id"
);

/// Checks that `value` is at most `max` characters; `InvalidArgument` naming `field` otherwise.
pub fn check_length(field: &str, value: &str, min: usize, max: usize) -> Result<(), BillingError> {
    let length = value.chars().count();
    if length < min || length > max {
        return Err(BillingError::InvalidArgument(if min > 0 && length == 0 {
            format!("`{field}` is required")
        } else {
            format!("`{field}` must be {min} to {max} characters, got {length}")
        }));
    }
    if value.chars().any(char::is_control) {
        return Err(BillingError::InvalidArgument(format!(
            "`{field}` must not contain control characters"
        )));
    }
    Ok(())
}

/// Returns the ISO 4217 code to use: `USD` when empty, else three upper-case letters.
pub fn parse_currency(text: &str) -> Result<String, BillingError> {
    if text.is_empty() {
        return Ok("USD".to_owned());
    }
    if text.len() == 3 && text.bytes().all(|byte| byte.is_ascii_uppercase()) {
        Ok(text.to_owned())
    } else {
        Err(BillingError::InvalidArgument(format!(
            "`currency` must be three upper-case letters (ISO 4217), got `{text}`"
        )))
    }
}

/// Checks a plan code: 1 to 64 of `a-z 0-9 _ -`, starting with a letter or digit.
pub fn check_plan_code(code: &str) -> Result<(), BillingError> {
    let valid = !code.is_empty()
        && code.len() <= 64
        && code.as_bytes()[0].is_ascii_alphanumeric()
        && code.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_' || byte == b'-'
        });
    if valid {
        Ok(())
    } else {
        Err(BillingError::InvalidArgument(format!(
            "`code` must be 1 to 64 of a-z, 0-9, `_`, `-` starting with a letter or digit, got `{code}`"
        )))
    }
}

/// Returns the features sorted and without duplicates; each must be 1 to 64 of `a-z 0-9 _ - . :`.
pub fn normalize_features(features: Vec<String>) -> Result<Vec<String>, BillingError> {
    let mut features = features;
    for feature in &features {
        let valid = !feature.is_empty()
            && feature.len() <= 64
            && feature.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"_-.:".contains(&byte)
            });
        if !valid {
            return Err(BillingError::InvalidArgument(format!(
                "feature `{feature}` must be 1 to 64 of a-z, 0-9, `_`, `-`, `.`, `:`"
            )));
        }
    }
    features.sort();
    features.dedup();
    Ok(features)
}

/// The length of one billing period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Day,
    Week,
    Month,
    Year,
}

impl Interval {
    /// Returns the name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Year => "year",
        }
    }

    /// Parses the name stored in the database.
    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            "month" => Some(Self::Month),
            "year" => Some(Self::Year),
            _ => None,
        }
    }

    /// Returns the start of period `k` (0-based) counted from `anchor`. Months and years are calendar
    /// steps; an anchor on a day a month lacks falls on that month's last day.
    pub fn boundary(self, anchor: OffsetDateTime, k: i64) -> OffsetDateTime {
        match self {
            Self::Day => anchor + Duration::days(k),
            Self::Week => anchor + Duration::weeks(k),
            Self::Month => add_months(anchor, k),
            Self::Year => add_months(anchor, k * 12),
        }
    }

    /// Returns the period `[start, end)` that contains `instant`; `instant` must not precede `anchor`.
    pub fn period_containing(self, anchor: OffsetDateTime, instant: OffsetDateTime) -> Period {
        let mut k = match self {
            Self::Day => ((instant - anchor).whole_seconds() / 86_400).max(0),
            Self::Week => ((instant - anchor).whole_seconds() / 604_800).max(0),
            Self::Month | Self::Year => {
                let months = i64::from(instant.year() - anchor.year()) * 12
                    + i64::from(instant.month() as u8)
                    - i64::from(anchor.month() as u8);
                let step = if self == Self::Year { 12 } else { 1 };
                (months / step).max(0)
            }
        };
        while k > 0 && self.boundary(anchor, k) > instant {
            k -= 1;
        }
        while self.boundary(anchor, k + 1) <= instant {
            k += 1;
        }
        Period {
            start: self.boundary(anchor, k),
            end: self.boundary(anchor, k + 1),
        }
    }

    /// Returns the first period boundary strictly after `instant` (the anchor itself when `instant`
    /// precedes it).
    pub fn next_boundary(self, anchor: OffsetDateTime, instant: OffsetDateTime) -> OffsetDateTime {
        if instant < anchor {
            anchor
        } else {
            self.period_containing(anchor, instant).end
        }
    }
}

fn add_months(instant: OffsetDateTime, months: i64) -> OffsetDateTime {
    let total = i64::from(instant.year()) * 12 + i64::from(instant.month() as u8) - 1 + months;
    let year = i32::try_from(total.div_euclid(12)).unwrap_or(i32::MAX);
    let month = time::Month::try_from(u8::try_from(total.rem_euclid(12) + 1).unwrap_or(1))
        .unwrap_or(time::Month::January);
    let day = instant.day().min(month.length(year));
    match Date::from_calendar_date(year, month, day) {
        Ok(date) => instant.replace_date(date),
        Err(_) => instant,
    }
}

/// A half-open interval of time `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// What overage costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverageMode {
    Block,
    Credits,
}

impl OverageMode {
    /// Returns the name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Credits => "credits",
        }
    }

    /// Parses the name stored in the database.
    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "block" => Some(Self::Block),
            "credits" => Some(Self::Credits),
            _ => None,
        }
    }
}

/// The terms of a plan that decide status over time.
#[derive(Debug, Clone, Copy)]
pub struct PlanTerms {
    pub price_micros: i64,
    pub interval: Interval,
    pub grace: Duration,
}

/// The stored facts of a subscription, from which its status at any instant follows.
#[derive(Debug, Clone)]
pub struct SubscriptionFacts {
    pub started_at: OffsetDateTime,
    pub anchor: OffsetDateTime,
    pub trial_ends_at: Option<OffsetDateTime>,
    pub paid_through: OffsetDateTime,
    pub last_payment_at: Option<OffsetDateTime>,
    pub payment_failed_at: Option<OffsetDateTime>,
    pub cancel_at: Option<OffsetDateTime>,
    pub ended_at: Option<OffsetDateTime>,
    pub end_reason: Option<EndReason>,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Canceled,
    Expired,
}

impl EndReason {
    /// Returns the name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Canceled => "canceled",
            Self::Expired => "expired",
        }
    }

    /// Parses the name stored in the database.
    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "canceled" => Some(Self::Canceled),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// A subscription's status as of one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Trialing,
    Active,
    PastDue,
    Canceled,
    Expired,
}

/// Everything about a subscription that depends on the clock, computed for one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionState {
    pub status: Status,
    /// The quota period containing the instant (or the last one, once ended).
    pub period: Period,
    pub past_due_since: Option<OffsetDateTime>,
    pub grace_ends_at: Option<OffsetDateTime>,
    /// When the subscription ended, possibly by the passage of time alone (not yet stored).
    pub ended_at: Option<OffsetDateTime>,
    /// The next instant at which this state changes by the passage of time alone.
    pub valid_until: Option<OffsetDateTime>,
}

impl SubscriptionState {
    /// Tells whether the subscription may still be served (possibly with a past-due warning).
    pub fn is_live(&self) -> bool {
        self.ended_at.is_none()
    }
}

fn earliest(candidates: &[Option<OffsetDateTime>]) -> Option<OffsetDateTime> {
    candidates.iter().flatten().min().copied()
}

/// Computes a subscription's state at `now` from its stored facts and plan terms.
pub fn evaluate(
    facts: &SubscriptionFacts,
    plan: &PlanTerms,
    now: OffsetDateTime,
) -> SubscriptionState {
    let period_before = |instant: OffsetDateTime| -> Period {
        let last_moment = instant - Duration::nanoseconds(1);
        if last_moment < facts.anchor {
            Period {
                start: facts.started_at,
                end: facts.anchor,
            }
        } else {
            plan.interval.period_containing(facts.anchor, last_moment)
        }
    };
    let ended = |status: Status, at: OffsetDateTime| SubscriptionState {
        status,
        period: period_before(at.max(facts.started_at + Duration::nanoseconds(1))),
        past_due_since: None,
        grace_ends_at: None,
        ended_at: Some(at),
        valid_until: None,
    };

    if let (Some(at), Some(reason)) = (facts.ended_at, facts.end_reason) {
        let status = match reason {
            EndReason::Canceled => Status::Canceled,
            EndReason::Expired => Status::Expired,
        };
        return ended(status, at);
    }
    if let Some(cancel_at) = facts.cancel_at.filter(|&at| now >= at) {
        return ended(Status::Canceled, cancel_at);
    }
    if let Some(trial_end) = facts.trial_ends_at {
        if now < trial_end {
            return SubscriptionState {
                status: Status::Trialing,
                period: Period {
                    start: facts.started_at,
                    end: trial_end,
                },
                past_due_since: None,
                grace_ends_at: None,
                ended_at: None,
                valid_until: earliest(&[Some(trial_end), facts.cancel_at]),
            };
        }
        if plan.price_micros > 0 && facts.last_payment_at.is_none() {
            return ended(Status::Expired, trial_end);
        }
    }

    let period = plan
        .interval
        .period_containing(facts.anchor, now.max(facts.anchor));
    if plan.price_micros == 0 {
        return SubscriptionState {
            status: Status::Active,
            period,
            past_due_since: None,
            grace_ends_at: None,
            ended_at: None,
            valid_until: earliest(&[Some(period.end), facts.cancel_at]),
        };
    }

    let unpaid_since = (now >= facts.paid_through).then_some(facts.paid_through);
    let past_due_since = earliest(&[facts.payment_failed_at, unpaid_since]);
    match past_due_since {
        Some(since) => {
            let grace_ends_at = since + plan.grace;
            SubscriptionState {
                status: Status::PastDue,
                period,
                past_due_since: Some(since),
                grace_ends_at: Some(grace_ends_at),
                ended_at: None,
                valid_until: earliest(&[
                    Some(period.end),
                    (now < grace_ends_at).then_some(grace_ends_at),
                    facts.cancel_at,
                ]),
            }
        }
        None => SubscriptionState {
            status: Status::Active,
            period,
            past_due_since: None,
            grace_ends_at: None,
            ended_at: None,
            valid_until: earliest(&[Some(period.end), Some(facts.paid_through), facts.cancel_at]),
        },
    }
}

/// Where a customer stands for the gateway's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Good,
    PastDueInGrace,
    PastDue,
    NoSubscription,
    Inactive,
}

/// Returns the standing that follows from a subscription state at `now`.
pub fn standing(state: &SubscriptionState, now: OffsetDateTime) -> Standing {
    match state.status {
        Status::Trialing | Status::Active => Standing::Good,
        Status::PastDue => match state.grace_ends_at {
            Some(grace_end) if now < grace_end => Standing::PastDueInGrace,
            _ => Standing::PastDue,
        },
        Status::Canceled | Status::Expired => Standing::Inactive,
    }
}

/// The result of a successful renewal payment: the new paid-through instant and, when a new billing
/// anchor was needed, that anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub paid_through: OffsetDateTime,
    pub anchor: OffsetDateTime,
}

/// Returns what one successful renewal payment at `now` does: extend by one period from where the
/// subscription was paid through or, when more than one whole period was missed, start a new period now.
pub fn renew(facts: &SubscriptionFacts, interval: Interval, now: OffsetDateTime) -> Renewal {
    // `paid_through` never precedes the anchor: it starts at the anchor and only moves forward.
    let next = interval.next_boundary(facts.anchor, facts.paid_through);
    if next <= now {
        Renewal {
            paid_through: interval.boundary(now, 1),
            anchor: now,
        }
    } else {
        Renewal {
            paid_through: next,
            anchor: facts.anchor,
        }
    }
}

/// A freshly minted API key: the secret (shown once), its digest and display prefix (stored).
pub struct MintedKey {
    pub secret: String,
    pub digest: [u8; 32],
    pub prefix: String,
}

/// Mints a new API key in the DESIGN §4 format from the operating system's CSPRNG-seeded generator.
pub fn mint_api_key() -> MintedKey {
    use proto::api_key::{ALPHABET, DISPLAY_PREFIX_LEN, RANDOM_LEN};

    let mut random = String::with_capacity(RANDOM_LEN);
    while random.len() < RANDOM_LEN {
        let mut bytes = [0_u8; 64];
        rand::fill(&mut bytes[..]);
        // Rejection sampling: 248 is the largest multiple of 62 below 256, so every character is uniform.
        for byte in bytes.into_iter().filter(|&byte| byte < 248) {
            if random.len() == RANDOM_LEN {
                break;
            }
            random.push(char::from(ALPHABET[usize::from(byte % 62)]));
        }
    }
    let secret = proto::api_key::assemble(&random);
    MintedKey {
        digest: digest_key(&secret),
        prefix: secret[..DISPLAY_PREFIX_LEN].to_owned(),
        secret,
    }
}

/// Returns the SHA-256 digest under which a key is stored and resolved.
pub fn digest_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Problem codes (DESIGN §3) counted per customer and hour, in their stored order: a code is only ever
/// appended, so the positions of `customer_hourly_stats.answered` keep their meaning. 401s are absent: no
/// valid key, no customer to count them for.
pub const ANSWER_CODES: [&str; 13] = [
    "subscription_required",
    "subscription_inactive",
    "payment_past_due",
    "quota_exhausted",
    "credits_exhausted",
    "plan_excludes_route",
    "rate_limited",
    "billing_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "payload_too_large",
    "bad_request",
    "upstream_tls",
];

/// Upper bounds (ms) of the upstream latency buckets counted per customer and hour; one more bucket, +Inf,
/// follows. Gateways send counts in this order.
pub const UPSTREAM_LATENCY_BUCKETS_MS: [f64; 13] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
];

/// Returns the upper bound (ms) of the bucket holding the `quantile` of `buckets` (counts per bucket of
/// `UPSTREAM_LATENCY_BUCKETS_MS`, then +Inf, reported as the last finite bound); 0 with no counts.
pub fn latency_quantile_ms(buckets: &[i64], quantile: f64) -> f64 {
    let total: i64 = buckets.iter().sum();
    if total <= 0 {
        return 0.0;
    }
    let rank = (quantile * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (index, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return UPSTREAM_LATENCY_BUCKETS_MS
                .get(index)
                .copied()
                .unwrap_or(UPSTREAM_LATENCY_BUCKETS_MS[UPSTREAM_LATENCY_BUCKETS_MS.len() - 1]);
        }
    }
    UPSTREAM_LATENCY_BUCKETS_MS[UPSTREAM_LATENCY_BUCKETS_MS.len() - 1]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_latency_quantile_is_the_upper_bound_of_its_bucket() {
        let mut buckets = vec![0_i64; UPSTREAM_LATENCY_BUCKETS_MS.len() + 1];
        buckets[2] = 94; // ≤ 5 ms
        buckets[5] = 6; // ≤ 50 ms

        assert_eq!(latency_quantile_ms(&buckets, 0.95), 50.0);
        assert_eq!(latency_quantile_ms(&buckets, 0.94), 5.0);
        assert_eq!(latency_quantile_ms(&[], 0.95), 0.0);
    }

    use time::macros::datetime;

    use super::*;

    fn monthly_facts(start: OffsetDateTime) -> SubscriptionFacts {
        SubscriptionFacts {
            started_at: start,
            anchor: start,
            trial_ends_at: None,
            paid_through: start,
            last_payment_at: None,
            payment_failed_at: None,
            cancel_at: None,
            ended_at: None,
            end_reason: None,
        }
    }

    const PAID_MONTHLY: PlanTerms = PlanTerms {
        price_micros: 10_000_000,
        interval: Interval::Month,
        grace: Duration::days(3),
    };

    #[test]
    fn month_boundaries_clamp_to_the_last_day_without_drifting() {
        let anchor = datetime!(2026-01-31 10:00 UTC);

        assert_eq!(
            Interval::Month.boundary(anchor, 1),
            datetime!(2026-02-28 10:00 UTC)
        );
        assert_eq!(
            Interval::Month.boundary(anchor, 2),
            datetime!(2026-03-31 10:00 UTC)
        );
        assert_eq!(
            Interval::Year.boundary(datetime!(2028-02-29 0:00 UTC), 1),
            datetime!(2029-02-28 0:00 UTC)
        );
    }

    #[test]
    fn the_period_containing_an_instant_is_half_open() {
        let anchor = datetime!(2026-01-31 10:00 UTC);

        let at_boundary =
            Interval::Month.period_containing(anchor, datetime!(2026-02-28 10:00 UTC));
        let just_before =
            Interval::Month.period_containing(anchor, datetime!(2026-02-28 09:59:59 UTC));
        let weekly = Interval::Week.period_containing(anchor, datetime!(2026-02-15 0:00 UTC));

        assert_eq!(at_boundary.start, datetime!(2026-02-28 10:00 UTC));
        assert_eq!(at_boundary.end, datetime!(2026-03-31 10:00 UTC));
        assert_eq!(just_before.start, anchor);
        assert_eq!(weekly.start, datetime!(2026-02-14 10:00 UTC));
    }

    #[test]
    fn an_unpaid_period_end_makes_a_subscription_past_due_then_beyond_grace() {
        let start = datetime!(2026-01-15 12:00 UTC);
        let mut facts = monthly_facts(start);
        facts.paid_through = datetime!(2026-02-15 12:00 UTC);
        facts.last_payment_at = Some(start);

        let active = evaluate(&facts, &PAID_MONTHLY, datetime!(2026-02-01 0:00 UTC));
        let in_grace = evaluate(&facts, &PAID_MONTHLY, datetime!(2026-02-16 0:00 UTC));
        let beyond = evaluate(&facts, &PAID_MONTHLY, datetime!(2026-02-19 0:00 UTC));

        assert_eq!(active.status, Status::Active);
        assert_eq!(active.valid_until, Some(datetime!(2026-02-15 12:00 UTC)));
        assert_eq!(in_grace.status, Status::PastDue);
        assert_eq!(
            standing(&in_grace, datetime!(2026-02-16 0:00 UTC)),
            Standing::PastDueInGrace
        );
        assert_eq!(
            in_grace.grace_ends_at,
            Some(datetime!(2026-02-18 12:00 UTC))
        );
        assert_eq!(
            standing(&beyond, datetime!(2026-02-19 0:00 UTC)),
            Standing::PastDue
        );
    }

    #[test]
    fn renewal_extends_from_paid_through_or_restarts_after_a_missed_period() {
        let start = datetime!(2026-01-15 12:00 UTC);
        let mut facts = monthly_facts(start);

        let first = renew(&facts, Interval::Month, start);
        facts.paid_through = first.paid_through;
        let late = renew(&facts, Interval::Month, datetime!(2026-02-20 0:00 UTC));
        let very_late = renew(&facts, Interval::Month, datetime!(2026-03-20 0:00 UTC));

        assert_eq!(first.paid_through, datetime!(2026-02-15 12:00 UTC));
        assert_eq!(late.paid_through, datetime!(2026-03-15 12:00 UTC));
        assert_eq!(late.anchor, start);
        assert_eq!(very_late.anchor, datetime!(2026-03-20 0:00 UTC));
        assert_eq!(very_late.paid_through, datetime!(2026-04-20 0:00 UTC));
    }

    #[test]
    fn an_unpaid_trial_expires_and_a_scheduled_cancellation_ends_at_its_instant() {
        let start = datetime!(2026-01-15 12:00 UTC);
        let trial_end = datetime!(2026-01-29 12:00 UTC);
        let mut facts = monthly_facts(start);
        facts.anchor = trial_end;
        facts.trial_ends_at = Some(trial_end);
        facts.paid_through = trial_end;

        let trialing = evaluate(&facts, &PAID_MONTHLY, datetime!(2026-01-20 0:00 UTC));
        let expired = evaluate(&facts, &PAID_MONTHLY, datetime!(2026-01-30 0:00 UTC));
        facts.cancel_at = Some(datetime!(2026-01-25 0:00 UTC));
        let canceled = evaluate(&facts, &PAID_MONTHLY, datetime!(2026-01-26 0:00 UTC));

        assert_eq!(trialing.status, Status::Trialing);
        assert_eq!(trialing.period.end, trial_end);
        assert_eq!(expired.status, Status::Expired);
        assert_eq!(expired.ended_at, Some(trial_end));
        assert_eq!(canceled.status, Status::Canceled);
    }

    #[test]
    fn a_free_plan_stays_active_and_its_period_rolls_over() {
        let start = datetime!(2026-01-15 12:00 UTC);
        let facts = monthly_facts(start);
        let free = PlanTerms {
            price_micros: 0,
            ..PAID_MONTHLY
        };

        let later = evaluate(&facts, &free, datetime!(2026-05-20 0:00 UTC));

        assert_eq!(later.status, Status::Active);
        assert_eq!(later.period.start, datetime!(2026-05-15 12:00 UTC));
    }

    #[test]
    fn minted_keys_are_well_formed_and_distinct() {
        let first = mint_api_key();
        let second = mint_api_key();

        assert!(proto::api_key::is_well_formed(&first.secret));
        assert_ne!(first.secret, second.secret);
        assert_eq!(first.prefix.len(), 12);
        assert_eq!(first.digest, digest_key(&first.secret));
    }
}
