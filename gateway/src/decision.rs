//! The decision per request (DESIGN §2): framing → key → entitlement → standing → admission. It ends in a
//! [`Verdict`] to forward under or a [`Refusal`], and reads only the gateway's own types (`backends`
//! converts billing's and usage's messages).

use std::{sync::Arc, time::SystemTime};

use http::{HeaderMap, HeaderValue, request::Parts};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    backends::{BackendError, Backends},
    entitlements::{Entitlement, Lookup, Standing},
    error::{Facts, RateLimit, Refusal},
    framing,
    headers::{self, KeySource},
    leases::LeaseSpend,
    lessor::Lessor,
    problem::{Code, Money},
    proxy::Gateway,
    routes::{FailureMode, Route},
    stats::RequestRecord,
};

/// One request's admission, as it is asked for.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// The admission's id, unique per request; usage remembers decisions by it.
    pub id: &'a str,
    pub entitlement: &'a Entitlement,
    /// The route's price.
    pub units: i64,
}

/// What an admission decided, with the figures the answer shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionOutcome {
    pub decision: AdmissionDecision,
    /// Units of the period used, counting this request when admitted.
    pub quota_used: i64,
    /// Units included in the period.
    pub quota_limit: i64,
    /// When the period's counter starts again from zero.
    pub quota_resets_at: Option<OffsetDateTime>,
    /// Credits this admission took; 0 when refused.
    pub credits_taken_micros: i64,
    /// Spendable credits after this decision; `None` when they are not loaded (plans that block overage).
    pub credits_remaining_micros: Option<i64>,
}

/// Whether a request is admitted, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionDecision {
    /// The units are taken.
    Admitted,
    /// Over the plan's rate: retry after `retry_after_ms`.
    RateLimited { retry_after_ms: u64 },
    /// The period's included units are used and the plan blocks overage.
    QuotaExhausted,
    /// Overage is paid from credits and the balance cannot cover the request.
    CreditsExhausted,
}

/// A request the decision lets through: where to, whose it is, and on what terms.
pub struct Verdict<'a> {
    pub route: &'a Route,
    pub entitlement: Arc<Entitlement>,
    /// Where the API key came from, so that it is not forwarded.
    pub key_source: KeySource,
    pub terms: Terms<'a>,
}

/// The terms a request is forwarded on.
pub enum Terms<'a> {
    /// Admitted: its units are taken until the request is settled.
    Paid(Box<Paid<'a>>),
    /// Usage could not decide and the route is `failure_mode = "open"`: passed unpaid within the key's
    /// budget, and marked degraded.
    Degraded,
}

/// An admitted request's charge, and what its answer tells the customer.
pub struct Paid<'a> {
    pub outcome: AdmissionOutcome,
    /// Computed at the decision, so `RateLimit`'s reset counts from then.
    pub rate_limit: RateLimit,
    pub charge: Charge<'a>,
}

/// The units an admitted request took, until it is settled. Dropped unsettled — the client went away
/// (hyper drops the request's future) or the gateway answered before settling — it gives them back in the
/// background.
pub struct Charge<'a> {
    taken_from: TakenFrom<'a>,
    customer_id: String,
    admission_id: String,
    settled: bool,
}

/// Where an admission's units were taken, and so where a refund goes.
enum TakenFrom<'a> {
    /// Usage admitted the request: a refund goes to usage by admission id.
    Usage(&'a Backends),
    /// Spent from a lease this gateway holds: a refund goes back into the lease, or against it at usage
    /// once it has been returned.
    Lease {
        lessor: &'a Lessor,
        spend: LeaseSpend,
        units: u64,
    },
}

impl Charge<'_> {
    /// Settles the charge: kept when the customer was `served`, otherwise given back now (and in the
    /// background if usage cannot take the refund at once).
    pub async fn settle(mut self, served: bool) {
        if !served {
            match &self.taken_from {
                // Settled only once the refund is out of our hands: if this future is dropped meanwhile,
                // the guard refunds again (refunds are idempotent by admission id).
                TakenFrom::Usage(backends) => {
                    backends.refund(&self.customer_id, &self.admission_id).await;
                }
                TakenFrom::Lease {
                    lessor,
                    spend,
                    units,
                } => lessor.refund(spend, &self.admission_id, *units),
            }
        }
        self.settled = true;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        match &self.taken_from {
            TakenFrom::Usage(backends) => {
                backends.refund_later(&self.customer_id, &self.admission_id)
            }
            TakenFrom::Lease {
                lessor,
                spend,
                units,
            } => lessor.refund(spend, &self.admission_id, *units),
        }
    }
}

impl Gateway {
    /// Decides whether the request with head `parts`, for `route` (`None`: no route matched), is forwarded.
    /// Fills in `record` as the decision goes.
    pub(crate) async fn decide<'a>(
        &'a self,
        parts: &Parts,
        route: Option<&'a Route>,
        record: &mut RequestRecord,
    ) -> Result<Verdict<'a>, Refusal> {
        framing::check(&parts.headers).map_err(|refusal| {
            // The rest of this connection's bytes can no longer be trusted to mean what they seem; HTTP/2
            // frames every request on its own.
            if parts.version < http::Version::HTTP_2 {
                refusal.closing_connection()
            } else {
                refusal
            }
        })?;
        let route = route.ok_or_else(|| Refusal::new(Code::RouteNotFound))?;
        let (digest, key_source) = key_digest(&parts.headers)?;
        if framing::declared_length(&parts.headers)
            .is_some_and(|length| length > self.file.limits.max_body_bytes)
        {
            return Err(Refusal::new(Code::PayloadTooLarge));
        }
        let entitlement = self.entitlement(digest).await?;
        tracing::Span::current().record("customer_id", entitlement.customer_id.as_str());
        record.customer_id = Some(entitlement.customer_id.clone());
        check_standing(&entitlement, route)?;
        let terms = match self.admit_from_lease(route, &entitlement) {
            Some(terms) => terms,
            None => self.admit(route, digest, &entitlement).await?,
        };
        if let Terms::Paid(paid) = &terms {
            tracing::Span::current().record("units", route.price);
            record.admitted = true;
            record.units = route.price;
            record.credits_micros = paid.outcome.credits_taken_micros;
        }
        Ok(Verdict {
            route,
            entitlement,
            key_source,
            terms,
        })
    }

    /// Returns who the key with `digest` belongs to, as billing (or the cache) says.
    async fn entitlement(&self, digest: [u8; 32]) -> Result<Arc<Entitlement>, Refusal> {
        match self.cache.lookup(digest).await {
            Ok(Lookup::Known { entitlement, .. }) => Ok(entitlement),
            Ok(Lookup::Unknown) => Err(Refusal::new(Code::InvalidApiKey)),
            // Billing cannot say who this key belongs to and nothing usable is cached: even an open route
            // passes only keys billing has confirmed, or anyone could invent a key with a valid checksum.
            Err(error) => {
                count_backend_error("billing", &error);
                Err(unavailable())
            }
        }
    }

    /// Admits the request at `route`'s price from the customer's lease, in memory; `None` when leases are
    /// off or no lease of the customer can cover it now (it is then admitted per request).
    fn admit_from_lease<'a>(
        &'a self,
        route: &'a Route,
        entitlement: &Arc<Entitlement>,
    ) -> Option<Terms<'a>> {
        let lessor = self.lessor.as_deref()?;
        let units = u64::try_from(route.price).ok()?;
        let spend = lessor.spend(&entitlement.customer_id, units)?;
        lessor.admitted(entitlement, units);
        metrics::counter!("paygate_gateway_admissions_total", "via" => "lease").increment(1);
        let outcome = outcome_from_lease(&spend);
        let rate_limit = rate_limit_headers(entitlement, &outcome);
        Some(Terms::Paid(Box::new(Paid {
            charge: Charge {
                taken_from: TakenFrom::Lease {
                    lessor,
                    spend,
                    units,
                },
                customer_id: entitlement.customer_id.clone(),
                admission_id: Uuid::new_v4().to_string(),
                settled: false,
            },
            outcome,
            rate_limit,
        })))
    }

    /// Admits the request at `route`'s price through usage, or refuses it; when usage cannot decide,
    /// passes it on an open route within the key's budget.
    async fn admit<'a>(
        &'a self,
        route: &'a Route,
        digest: [u8; 32],
        entitlement: &Arc<Entitlement>,
    ) -> Result<Terms<'a>, Refusal> {
        // The admission id is ours, never the client's `X-Request-Id`: usage replays an admission with a
        // known id without charging, so a client-chosen id reused on purpose would buy many upstream calls
        // for the price of one.
        let admission_id = Uuid::new_v4().to_string();
        let admission = Admission {
            id: &admission_id,
            entitlement: entitlement.as_ref(),
            units: route.price,
        };
        let outcome = match self.backends.admit(&admission).await {
            Ok(outcome) => outcome,
            Err(error) => {
                count_backend_error("usage", &error);
                if let Some(suppressed) = USAGE_FAILED.event() {
                    tracing::warn!(%error, suppressed, "usage could not admit");
                }
                return self.pass_degraded(route, digest).map(|()| Terms::Degraded);
            }
        };
        let rate_limit = rate_limit_headers(entitlement, &outcome);
        match outcome.decision {
            AdmissionDecision::Admitted => {
                if let Some(lessor) = &self.lessor {
                    lessor.admitted(entitlement, u64::try_from(route.price).unwrap_or(0));
                }
                metrics::counter!("paygate_gateway_admissions_total", "via" => "usage")
                    .increment(1);
                Ok(Terms::Paid(Box::new(Paid {
                    charge: Charge {
                        taken_from: TakenFrom::Usage(&self.backends),
                        customer_id: entitlement.customer_id.clone(),
                        admission_id,
                        settled: false,
                    },
                    outcome,
                    rate_limit,
                })))
            }
            AdmissionDecision::RateLimited { retry_after_ms } => {
                let seconds = retry_after_ms.div_ceil(1000).max(1);
                let limits = &entitlement.limits;
                Err(Refusal::new(Code::RateLimited)
                    .with_detail(format!(
                        "Plan '{}' allows {} requests per {} ms with bursts of {}; retry in {} ms.",
                        entitlement.plan_code,
                        limits.rate_limit,
                        limits.rate_period_ms,
                        limits.burst,
                        retry_after_ms
                    ))
                    .with_facts(Facts {
                        plan: Some(entitlement.plan_code.clone()),
                        retry_after: Some(seconds),
                        ..Facts::default()
                    })
                    .with_retry_after(seconds)
                    .with_rate_limit(rate_limit))
            }
            AdmissionDecision::QuotaExhausted => {
                Err(exhausted(Code::QuotaExhausted, entitlement, &outcome)
                    .with_rate_limit(rate_limit))
            }
            AdmissionDecision::CreditsExhausted => {
                Err(exhausted(Code::CreditsExhausted, entitlement, &outcome)
                    .with_rate_limit(rate_limit))
            }
        }
    }

    /// Lets a request usage could not decide through on a `failure_mode = "open"` route while the key's
    /// budget there lasts; refuses it with 503 otherwise.
    fn pass_degraded(&self, route: &Route, digest: [u8; 32]) -> Result<(), Refusal> {
        if route.failure_mode == FailureMode::Closed {
            return Err(unavailable());
        }
        {
            let mut passes = self
                .degraded_passes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let used = passes.entry((digest, route.prefix.clone())).or_insert(0);
            let price = u32::try_from(route.price).unwrap_or(u32::MAX);
            if used.saturating_add(price) > route.open_budget {
                return Err(unavailable());
            }
            *used += price;
        }
        metrics::counter!("paygate_gateway_degraded_passes_total", "route" => metrics::SharedString::from(route.label.clone()))
            .increment(1);
        if let Some(suppressed) = DEGRADED_PASS.event() {
            tracing::warn!(route = %route.prefix, suppressed, "forwarding without a decision (failure_mode = open)");
        }
        Ok(())
    }
}

/// Returns the figures an admission from a lease answers with: those of the grant, less what this
/// gateway spent from the lease since (docs/leases.md, "What the headers say under leases").
fn outcome_from_lease(spend: &LeaseSpend) -> AdmissionOutcome {
    let figures = spend.lease.figures_after(&spend.spent);
    AdmissionOutcome {
        decision: AdmissionDecision::Admitted,
        quota_used: figures.quota_used,
        quota_limit: figures.quota_limit,
        quota_resets_at: figures.quota_resets_at.map(OffsetDateTime::from),
        credits_taken_micros: i64::try_from(spend.spent.credit_micros).unwrap_or(i64::MAX),
        credits_remaining_micros: figures.credits_remaining_micros,
    }
}

/// Adds what a paying customer is told about their allowance to the upstream's answer.
pub fn insert_allowance_headers(
    answer: &mut HeaderMap,
    entitlement: &Entitlement,
    outcome: &AdmissionOutcome,
    rate_limit: RateLimit,
) {
    rate_limit.insert_into(answer);
    if let Some(micros) = outcome.credits_remaining_micros {
        let money = Money::from_micros(micros, &entitlement.currency);
        if let Ok(value) = HeaderValue::from_str(&format!("{} {}", money.amount, money.currency)) {
            answer.insert(headers::CREDITS_REMAINING, value);
        }
    }
    if entitlement.standing == Standing::PastDueInGrace {
        answer.insert(
            headers::PAYMENT_WARNING,
            HeaderValue::from_static("payment past due; pay to avoid interruption"),
        );
    }
}

/// Returns the digest of the request's API key and where the key was sent. Malformed, unknown and revoked
/// keys get one identical answer, decided before any lookup when the checksum already shows a typo.
fn key_digest(headers: &HeaderMap) -> Result<([u8; 32], KeySource), Refusal> {
    let (key, key_source) =
        headers::api_key(headers).ok_or_else(|| Refusal::new(Code::MissingApiKey))?;
    if !headers::is_well_formed_key(key) {
        return Err(Refusal::new(Code::InvalidApiKey));
    }
    Ok((Sha256::digest(key.as_bytes()).into(), key_source))
}

/// Refuses a customer whose account does not let requests through, or whose plan lacks the feature the
/// route requires.
fn check_standing(entitlement: &Entitlement, route: &Route) -> Result<(), Refusal> {
    let code = match entitlement.standing {
        Standing::Good | Standing::PastDueInGrace => None,
        Standing::PastDue => Some(Code::PaymentPastDue),
        Standing::NoSubscription => Some(Code::SubscriptionRequired),
        Standing::Inactive => Some(Code::SubscriptionInactive),
    };
    if let Some(code) = code {
        let plan = (!entitlement.plan_code.is_empty()).then(|| entitlement.plan_code.clone());
        return Err(Refusal::new(code).with_facts(Facts {
            plan,
            ..Facts::default()
        }));
    }
    let Some(feature) = route.feature.as_ref() else {
        return Ok(());
    };
    if entitlement
        .features
        .iter()
        .any(|granted| granted == feature)
    {
        return Ok(());
    }
    Err(Refusal::new(Code::PlanExcludesRoute)
        .with_detail(format!(
            "Plan '{}' does not include '{feature}', which {} requires.",
            entitlement.plan_code, route.prefix
        ))
        .with_facts(Facts {
            plan: Some(entitlement.plan_code.clone()),
            ..Facts::default()
        }))
}

/// Returns the refusal of a request whose period quota or credits cannot pay for it.
fn exhausted(code: Code, entitlement: &Entitlement, outcome: &AdmissionOutcome) -> Refusal {
    let detail = match code {
        Code::QuotaExhausted => format!(
            "Plan '{}' includes {} units per period and all {} are used.",
            entitlement.plan_code, outcome.quota_limit, outcome.quota_used
        ),
        _ => format!(
            "Your prepaid credits cannot cover this request on plan '{}'.",
            entitlement.plan_code
        ),
    };
    Refusal::new(code).with_detail(detail).with_facts(Facts {
        plan: Some(entitlement.plan_code.clone()),
        limit: Some(outcome.quota_limit),
        used: Some(outcome.quota_used),
        resets_at: outcome.quota_resets_at.and_then(rfc3339),
        retry_after: None,
        balance: outcome
            .credits_remaining_micros
            .map(|micros| Money::from_micros(micros, &entitlement.currency)),
    })
}

/// Returns the refusal of a request that cannot be decided now.
fn unavailable() -> Refusal {
    Refusal::new(Code::BillingUnavailable).with_retry_after(2)
}

/// Builds the IETF `RateLimit-Policy` and `RateLimit` headers (draft 10 syntax) for the period quota.
fn rate_limit_headers(entitlement: &Entitlement, outcome: &AdmissionOutcome) -> RateLimit {
    let limits = &entitlement.limits;
    let reset_seconds = outcome
        .quota_resets_at
        .map(|reset| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0);
            u64::try_from(reset.unix_timestamp())
                .unwrap_or(0)
                .saturating_sub(now)
        })
        .unwrap_or(0);
    let remaining = (outcome.quota_limit - outcome.quota_used).max(0);
    let period_seconds = entitlement
        .period_start
        .zip(entitlement.period_end)
        .map(|(start, end)| end.unix_timestamp() - start.unix_timestamp());
    let window = match (outcome.quota_resets_at, period_seconds) {
        (Some(_), Some(seconds)) => format!(";w={seconds}"),
        _ => String::new(),
    };
    let mut policy = format!("\"quota\";q={}{window}", limits.included_units);
    if limits.rate_limit > 0 {
        policy.push_str(&format!(
            ", \"rate\";q={};w={}",
            limits.rate_limit,
            u64::from(limits.rate_period_ms).div_ceil(1000)
        ));
    }
    let limit = format!("\"quota\";r={remaining};t={reset_seconds}");
    RateLimit {
        policy: HeaderValue::from_str(&policy)
            .unwrap_or_else(|_| HeaderValue::from_static("\"quota\"")),
        limit: HeaderValue::from_str(&limit)
            .unwrap_or_else(|_| HeaderValue::from_static("\"quota\"")),
    }
}

/// Formats `instant` as RFC 3339 in UTC, to the second.
fn rfc3339(instant: OffsetDateTime) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(instant.unix_timestamp())
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn count_backend_error(backend: &'static str, error: &BackendError) {
    metrics::counter!("paygate_gateway_backend_errors_total", "backend" => backend, "kind" => error.kind())
        .increment(1);
}

static USAGE_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static DEGRADED_PASS: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
