//! The decision per request (DESIGN §2) and the forwarding that follows it.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use uuid::Uuid;

use proto::{
    billing::v1::{self as billing_pb, Standing},
    usage::v1::{self as usage_pb, Decision},
};

use crate::{
    backends::{BackendError, Backends},
    entitlements::{EntitlementCache, Lookup},
    headers::{self, Forwarding, KeySource},
    problem::{Actions, Code, Money, Problem},
    routes::{FailureMode, Route, RouteTable, RoutesFile},
    stats::{CustomerStats, RequestRecord},
};

/// Errors of bodies in flight; both directions stream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer.
pub type Body = BoxBody<Bytes, BoxError>;

/// Path under which the gateway serves its own health: 200 while the process serves (liveness).
pub const HEALTH_PATH: &str = "/_paygate/health";
/// Path under which the gateway serves its readiness: 200 when it can serve paid requests, else 503 with
/// what is not ready (see `readiness`).
pub const READY_PATH: &str = "/_paygate/ready";
/// Path prefix of the human pages per problem code.
pub const PROBLEMS_PATH: &str = "/problems/";

/// Everything the decision needs, shared by all connections.
pub struct Gateway {
    /// The routes in force: a reload replaces the whole table, and each request reads it once, so a
    /// request in flight finishes on the table it started with.
    pub(crate) routes: RwLock<Arc<RouteTable>>,
    /// The routes file as read at start; its settings other than the routes apply at restart.
    pub file: RoutesFile,
    pub readiness: Arc<crate::readiness::Readiness>,
    pub backends: Backends,
    pub cache: EntitlementCache,
    /// Units passed per (key digest, route prefix) while degraded, for `failure_mode = "open"` budgets.
    pub degraded_passes: Mutex<HashMap<([u8; 32], String), u32>>,
    /// Per-customer counts not yet reported to billing.
    pub stats: CustomerStats,
    /// How often they are reported.
    pub stats_interval: std::time::Duration,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What the gateway decided for one request (a problem code, or `forwarded`), carried on the answer to
/// `handle`, which counts it.
#[derive(Clone, Copy)]
struct Outcome(&'static str);

const FORWARDED: Outcome = Outcome("forwarded");

/// What an answer carries besides its status and body.
#[derive(Default)]
struct Extras {
    retry_after: Option<u64>,
    rate_limit: Option<(HeaderValue, HeaderValue)>,
}

impl Gateway {
    /// Returns the routes in force now.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts `table` in force for requests that start from now on; returns the table it replaces.
    pub fn replace_routes(&self, table: RouteTable) -> Arc<RouteTable> {
        std::mem::replace(
            &mut *self
                .routes
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            Arc::new(table),
        )
    }

    fn problem_response(
        &self,
        problem: Problem,
        request_id: &str,
        extras: Extras,
    ) -> Response<Body> {
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(full(problem.to_json()));
        *response.status_mut() = status;
        response.extensions_mut().insert(Outcome(problem.code));
        let answer = response.headers_mut();
        answer.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        answer.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(id) = HeaderValue::from_str(request_id) {
            answer.insert(headers::REQUEST_ID, id);
        }
        if status == StatusCode::UNAUTHORIZED {
            answer.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"paygate\", error=\"invalid_token\""),
            );
        }
        if let Some(seconds) = extras.retry_after {
            answer.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some((policy, limit)) = extras.rate_limit {
            answer.insert(headers::RATE_LIMIT_POLICY, policy);
            answer.insert(headers::RATE_LIMIT, limit);
        }
        response
    }

    fn problem(&self, code: Code) -> Problem {
        Problem::new(code, &self.file.problem_base_url)
    }

    fn actions(&self, code: Code) -> Option<Actions> {
        let top_up = matches!(code, Code::CreditsExhausted | Code::QuotaExhausted)
            .then(|| self.file.top_up_url.clone())
            .flatten();
        let upgrade = matches!(
            code,
            Code::QuotaExhausted
                | Code::PlanExcludesRoute
                | Code::SubscriptionRequired
                | Code::SubscriptionInactive
        )
        .then(|| self.file.upgrade_url.clone())
        .flatten();
        (top_up.is_some() || upgrade.is_some()).then_some(Actions { top_up, upgrade })
    }

    /// Answers one request.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let request_id = request_id(request.headers());
        let routes = self.routes();
        let route = routes.find(request.uri().path());
        // Never the key or any header: the customer, route, decision and units are recorded as known.
        let span = tracing::info_span!(
            "request",
            route = route.map_or("none", |route| route.prefix.as_str()),
            customer_id = tracing::field::Empty,
            code = tracing::field::Empty,
            units = tracing::field::Empty,
        );
        telemetry::traces::set_parent(
            &span,
            telemetry::traces::extract_from_headers(request.headers()),
        );
        let mut record = RequestRecord::default();
        let mut response = self
            .decide_and_forward(request, route, peer, &request_id, started, &mut record)
            .instrument(span.clone())
            .await;
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(headers::REQUEST_ID, id);
        }
        // Health checks and the problem pages are not decisions and are not counted.
        if let Some(Outcome(code)) = response.extensions_mut().remove::<Outcome>() {
            span.record("code", code);
            if let Some(customer_id) = record.customer_id.take() {
                self.stats.record(customer_id, code, &record);
            }
            let elapsed = started.elapsed();
            let route = route.map_or(metrics::SharedString::const_str("none"), |route| {
                metrics::SharedString::from(route.label.clone())
            });
            metrics::counter!(
                "paygate_gateway_requests_total",
                "route" => route.clone(),
                "code" => code,
                "status" => response.status().as_u16().to_string(),
            )
            .increment(1);
            metrics::histogram!("paygate_gateway_request_duration_seconds", "route" => route)
                .record(elapsed);
            if code != FORWARDED.0 {
                metrics::histogram!("paygate_gateway_decision_duration_seconds").record(elapsed);
            }
        }
        Ok(response)
    }

    async fn decide_and_forward(
        &self,
        request: Request<Incoming>,
        route: Option<&Route>,
        peer: SocketAddr,
        request_id: &str,
        started: Instant,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        let path = request.uri().path();
        if path == HEALTH_PATH {
            return text_response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n");
        }
        if path == READY_PATH {
            return self.ready_response();
        }
        if let Some(code) = path.strip_prefix(PROBLEMS_PATH) {
            return match Code::parse(code) {
                Some(code) => text_response(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    crate::problem::page(code),
                ),
                None => self.problem_response(
                    self.problem(Code::RouteNotFound),
                    request_id,
                    Extras::default(),
                ),
            };
        }
        if let Err((code, detail)) = check_framing(request.headers()) {
            let mut refusal = self.problem_response(
                self.problem(code).with_detail(detail),
                request_id,
                Extras::default(),
            );
            // The rest of this connection's bytes can no longer be trusted to mean what they seem.
            if request.version() < http::Version::HTTP_2 {
                refusal
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return refusal;
        }
        let Some(route) = route else {
            return self.problem_response(
                self.problem(Code::RouteNotFound),
                request_id,
                Extras::default(),
            );
        };
        let Some((key, key_source)) = headers::api_key(request.headers()) else {
            return self.problem_response(
                self.problem(Code::MissingApiKey),
                request_id,
                Extras::default(),
            );
        };
        // Malformed, unknown and revoked keys get one identical answer, decided before any lookup when the
        // checksum already shows a typo.
        if !proto::api_key::is_well_formed(key) {
            return self.problem_response(
                self.problem(Code::InvalidApiKey),
                request_id,
                Extras::default(),
            );
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if declared_length(request.headers())
            .is_some_and(|length| length > self.file.limits.max_body_bytes)
        {
            return self.problem_response(
                self.problem(Code::PayloadTooLarge),
                request_id,
                Extras::default(),
            );
        }

        let entitlement = match self.cache.lookup(digest).await {
            Ok(Lookup::Known { entitlement, .. }) => entitlement,
            Ok(Lookup::Unknown) => {
                return self.problem_response(
                    self.problem(Code::InvalidApiKey),
                    request_id,
                    Extras::default(),
                );
            }
            // Billing cannot say who this key belongs to and nothing usable is cached: even an open route
            // passes only keys billing has confirmed, or anyone could invent a key with a valid checksum.
            Err(error) => {
                count_backend_error("billing", &error);
                return self.unavailable(request_id);
            }
        };
        tracing::Span::current().record("customer_id", entitlement.customer_id.as_str());
        record.customer_id = Some(entitlement.customer_id.clone());
        if let Some(refusal) = self.refuse_by_standing(&entitlement, route, request_id) {
            return refusal;
        }

        let limits = entitlement.limits.unwrap_or_default();
        // The admission id is ours, never the client's `X-Request-Id`: usage replays an admission with a
        // known id without charging, so a client-chosen id reused on purpose would buy many upstream calls
        // for the price of one.
        let admission_id = Uuid::new_v4().to_string();
        let admission = usage_pb::AdmitRequest {
            request_id: admission_id.clone(),
            customer_id: entitlement.customer_id.clone(),
            subscription_id: entitlement.subscription_id.clone(),
            units: route.price,
            limits: Some(limits),
            period_start: entitlement.period_start,
            period_end: entitlement.period_end,
        };
        let decision = match self.backends.admit(admission).await {
            Ok(decision) => decision,
            Err(error) => {
                count_backend_error("usage", &error);
                if let Some(suppressed) = USAGE_FAILED.event() {
                    tracing::warn!(%error, suppressed, "usage could not admit");
                }
                return self
                    .degraded_or_unavailable(request, peer, route, digest, &entitlement, request_id)
                    .await;
            }
        };
        let period_seconds = entitlement
            .period_start
            .zip(entitlement.period_end)
            .map(|(start, end)| end.seconds - start.seconds);
        let rate_limit = rate_limit_headers(&limits, &decision, period_seconds);
        match decision.decision() {
            Decision::Admitted => {
                tracing::Span::current().record("units", route.price);
                record.admitted = true;
                record.units = route.price;
                record.credits_micros = decision.credits_taken_micros;
            }
            Decision::RateLimited => {
                let seconds = decision.retry_after_ms.div_ceil(1000).max(1);
                let mut problem = self.problem(Code::RateLimited).with_detail(format!(
                    "Plan '{}' allows {} requests per {} ms with bursts of {}; retry in {} ms.",
                    entitlement.plan_code,
                    limits.rate_limit,
                    limits.rate_period_ms,
                    limits.burst,
                    decision.retry_after_ms
                ));
                problem.plan = Some(entitlement.plan_code.clone());
                problem.retry_after = Some(seconds);
                let extras = Extras {
                    retry_after: Some(seconds),
                    rate_limit: Some(rate_limit),
                };
                return self.problem_response(problem, request_id, extras);
            }
            Decision::QuotaExhausted | Decision::CreditsExhausted | Decision::Unspecified => {
                let code = if decision.decision() == Decision::QuotaExhausted {
                    Code::QuotaExhausted
                } else {
                    Code::CreditsExhausted
                };
                let problem = self.quota_problem(code, &entitlement, &decision);
                let extras = Extras {
                    retry_after: None,
                    rate_limit: Some(rate_limit),
                };
                return self.problem_response(problem, request_id, extras);
            }
        }

        // From here the units are taken: whatever ends this request before an answer the customer pays
        // for is on its way (the client going away included) gives them back.
        let mut charge = ChargeGuard {
            backends: &self.backends,
            customer_id: &entitlement.customer_id,
            admission_id: &admission_id,
            settled: false,
        };
        let forwarding = self.forwarding(&request, peer, &entitlement, key_source);
        metrics::histogram!("paygate_gateway_decision_duration_seconds").record(started.elapsed());
        let asked_upstream = Instant::now();
        let response = self.forward(request, route, &forwarding, request_id).await;
        let upstream_took = asked_upstream.elapsed();
        metrics::histogram!("paygate_gateway_upstream_duration_seconds", "route" => metrics::SharedString::from(route.label.clone()))
            .record(upstream_took);
        let refund = match &response {
            Forwarded::Answer(answer) => {
                record.upstream = Some((answer.status().as_u16(), upstream_took));
                answer.status().is_server_error()
            }
            Forwarded::Unreachable
            | Forwarded::UntrustedUpstream
            | Forwarded::TimedOut
            | Forwarded::TooLarge
            | Forwarded::BadClientBody => true,
        };
        if refund {
            record.units = 0;
            record.credits_micros = 0;
            charge.refund_now().await;
        }
        charge.settled = true;
        let mut answer = match response {
            Forwarded::Answer(mut answer) => {
                answer.extensions_mut().insert(FORWARDED);
                answer
            }
            failed => return self.forwarding_failure(failed, request_id),
        };
        let answer_headers = answer.headers_mut();
        answer_headers.insert(headers::RATE_LIMIT_POLICY, rate_limit.0);
        answer_headers.insert(headers::RATE_LIMIT, rate_limit.1);
        if decision.credits_remaining_micros >= 0 {
            let money =
                Money::from_micros(decision.credits_remaining_micros, &entitlement.currency);
            if let Ok(value) =
                HeaderValue::from_str(&format!("{} {}", money.amount, money.currency))
            {
                answer_headers.insert(headers::CREDITS_REMAINING, value);
            }
        }
        if entitlement.standing() == Standing::PastDueInGrace {
            answer_headers.insert(
                headers::PAYMENT_WARNING,
                HeaderValue::from_static("payment past due; pay to avoid interruption"),
            );
        }
        answer
    }

    fn refuse_by_standing(
        &self,
        entitlement: &billing_pb::Entitlement,
        route: &Route,
        request_id: &str,
    ) -> Option<Response<Body>> {
        let code = match entitlement.standing() {
            Standing::Good | Standing::PastDueInGrace => None,
            Standing::PastDue => Some(Code::PaymentPastDue),
            Standing::NoSubscription | Standing::Unspecified => Some(Code::SubscriptionRequired),
            Standing::Inactive => Some(Code::SubscriptionInactive),
        };
        if let Some(code) = code {
            let mut problem = self.problem(code);
            if !entitlement.plan_code.is_empty() {
                problem.plan = Some(entitlement.plan_code.clone());
            }
            problem.actions = self.actions(code);
            return Some(self.problem_response(problem, request_id, Extras::default()));
        }
        let feature = route.feature.as_ref()?;
        if entitlement
            .features
            .iter()
            .any(|granted| granted == feature)
        {
            return None;
        }
        let mut problem = self.problem(Code::PlanExcludesRoute).with_detail(format!(
            "Plan '{}' does not include '{feature}', which {} requires.",
            entitlement.plan_code, route.prefix
        ));
        problem.plan = Some(entitlement.plan_code.clone());
        problem.actions = self.actions(Code::PlanExcludesRoute);
        Some(self.problem_response(problem, request_id, Extras::default()))
    }

    fn quota_problem(
        &self,
        code: Code,
        entitlement: &billing_pb::Entitlement,
        decision: &usage_pb::AdmitResponse,
    ) -> Problem {
        let detail = match code {
            Code::QuotaExhausted => format!(
                "Plan '{}' includes {} units per period and all {} are used.",
                entitlement.plan_code, decision.quota_limit, decision.quota_used
            ),
            _ => format!(
                "Your prepaid credits cannot cover this request on plan '{}'.",
                entitlement.plan_code
            ),
        };
        let mut problem = self.problem(code).with_detail(detail);
        problem.plan = Some(entitlement.plan_code.clone());
        problem.limit = Some(decision.quota_limit);
        problem.used = Some(decision.quota_used);
        problem.resets_at = decision.quota_resets_at.as_ref().and_then(rfc3339);
        if decision.credits_remaining_micros >= 0 {
            problem.balance = Some(Money::from_micros(
                decision.credits_remaining_micros,
                &entitlement.currency,
            ));
        }
        problem.actions = self.actions(code);
        problem
    }

    fn ready_response(&self) -> Response<Body> {
        let report = self
            .readiness
            .report(self.routes().routes().len(), &self.backends);
        let status = if report.ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut response = text_response(status, "application/json", report.body);
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    fn unavailable(&self, request_id: &str) -> Response<Body> {
        self.problem_response(
            self.problem(Code::BillingUnavailable),
            request_id,
            Extras {
                retry_after: Some(2),
                rate_limit: None,
            },
        )
    }

    /// Answers a request whose key billing has confirmed but that usage could not decide: 503, or on a
    /// `failure_mode = "open"` route a pass within the key's budget, marked degraded and carrying the
    /// customer as usual.
    async fn degraded_or_unavailable(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        route: &Route,
        digest: [u8; 32],
        entitlement: &billing_pb::Entitlement,
        request_id: &str,
    ) -> Response<Body> {
        if route.failure_mode == FailureMode::Closed {
            return self.unavailable(request_id);
        }
        {
            let mut passes = self
                .degraded_passes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let used = passes.entry((digest, route.prefix.clone())).or_insert(0);
            let price = u32::try_from(route.price).unwrap_or(u32::MAX);
            if used.saturating_add(price) > route.open_budget {
                return self.unavailable(request_id);
            }
            *used += price;
        }
        metrics::counter!("paygate_gateway_degraded_passes_total", "route" => metrics::SharedString::from(route.label.clone()))
            .increment(1);
        if let Some(suppressed) = DEGRADED_PASS.event() {
            tracing::warn!(route = %route.prefix, suppressed, "forwarding without a decision (failure_mode = open)");
        }
        let Some((_, key_source)) = headers::api_key(request.headers()) else {
            return self.unavailable(request_id);
        };
        let forwarding = self.forwarding(&request, peer, entitlement, key_source);
        match self.forward(request, route, &forwarding, request_id).await {
            Forwarded::Answer(mut answer) => {
                answer
                    .headers_mut()
                    .insert(headers::DEGRADED, HeaderValue::from_static("true"));
                answer.extensions_mut().insert(FORWARDED);
                answer
            }
            failed => self.forwarding_failure(failed, request_id),
        }
    }

    /// Returns what the upstream is told about the caller.
    fn forwarding(
        &self,
        request: &Request<Incoming>,
        peer: SocketAddr,
        entitlement: &billing_pb::Entitlement,
        key_source: KeySource,
    ) -> OwnedForwarding {
        let address = crate::client_ip::client_address(
            peer.ip(),
            request.headers(),
            &self.file.trusted_proxies,
        );
        OwnedForwarding {
            scheme: request
                .extensions()
                .get::<headers::Scheme>()
                .copied()
                .unwrap_or(headers::Scheme::Http),
            client_ip: address.client,
            forwarded_for: address.forwarded_for,
            // HTTP/2 clients name the host in `:authority`, which hyper keeps in the URI.
            host: request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .or_else(|| {
                    request
                        .uri()
                        .authority()
                        .map(|authority| authority.as_str())
                })
                .map(str::to_owned),
            customer_id: entitlement.customer_id.clone(),
            plan_code: entitlement.plan_code.clone(),
            key_source,
        }
    }

    /// Answers a request the upstream did not answer.
    fn forwarding_failure(&self, failed: Forwarded, request_id: &str) -> Response<Body> {
        let code = match failed {
            Forwarded::Answer(answer) => return answer,
            Forwarded::Unreachable => Code::UpstreamUnavailable,
            Forwarded::UntrustedUpstream => Code::UpstreamTls,
            Forwarded::TimedOut => Code::UpstreamTimeout,
            Forwarded::TooLarge => Code::PayloadTooLarge,
            Forwarded::BadClientBody => {
                let mut refusal = self.problem_response(
                    self.problem(Code::BadRequest).with_detail(
                        "The request body's framing was malformed (for example a bad chunk size); it \
                         was not served and nothing was charged.",
                    ),
                    request_id,
                    Extras::default(),
                );
                // The rest of this connection's bytes can no longer be trusted to mean what they seem.
                refusal
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return refusal;
            }
        };
        self.problem_response(self.problem(code), request_id, Extras::default())
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        route: &Route,
        forwarding: &OwnedForwarding,
        request_id: &str,
    ) -> Forwarded {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|value| value.as_str())
            .unwrap_or("/");
        let target = format!(
            "{}{}{}",
            route.upstream_origin, route.upstream_base_path, path_and_query
        );
        let Ok(uri) = target.parse() else {
            return Forwarded::Unreachable;
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        if route.upstream_tls {
            // The client named the gateway; an HTTPS upstream is reached by its own name (SNI and the
            // certificate), and virtual hosts behind it route by Host. The client's Host goes on in
            // X-Forwarded-Host; the client fills Host (HTTP/1.1) or :authority (HTTP/2) from the URL.
            parts.headers.remove(header::HOST);
        }
        headers::prepare_upstream_headers(
            &mut parts.headers,
            &Forwarding {
                scheme: forwarding.scheme,
                client_ip: forwarding.client_ip,
                forwarded_for: &forwarding.forwarded_for,
                host: forwarding.host.as_deref(),
                customer_id: &forwarding.customer_id,
                plan_code: &forwarding.plan_code,
                key_source: forwarding.key_source,
            },
        );
        if let Ok(id) = HeaderValue::from_str(request_id) {
            parts.headers.insert(headers::REQUEST_ID, id);
        }
        telemetry::traces::inject_into_headers(&telemetry::traces::current(), &mut parts.headers);
        let limit = usize::try_from(self.file.limits.max_body_bytes).unwrap_or(usize::MAX);
        // Errors of the client's body are told apart from the upstream's: a body that breaks its framing
        // (or a client that went away mid-body) is the client's fault, not an upstream outage.
        let body = http_body_util::Limited::new(body.map_err(ClientBodyError), limit).boxed();
        let outgoing = Request::from_parts(parts, body);
        match tokio::time::timeout(route.timeout, route.client.request(outgoing)).await {
            Err(_) => Forwarded::TimedOut,
            Ok(Err(error)) if caused_by::<http_body_util::LengthLimitError>(&error) => {
                Forwarded::TooLarge
            }
            Ok(Err(error)) if caused_by::<ClientBodyError>(&error) => {
                tracing::debug!(%error, route = %route.prefix, "client body broke off or broke its framing");
                Forwarded::BadClientBody
            }
            Ok(Err(error)) if crate::tls::tls_failure(&error).is_some() => {
                if let Some(suppressed) = UPSTREAM_TLS_FAILED.event()
                    && let Some(tls) = crate::tls::tls_failure(&error)
                {
                    tracing::warn!(error = %tls, route = %route.prefix, upstream = %route.upstream_origin, suppressed, "upstream TLS failed (its certificate or the handshake)");
                }
                Forwarded::UntrustedUpstream
            }
            Ok(Err(error)) => {
                if let Some(suppressed) = UPSTREAM_FAILED.event() {
                    tracing::warn!(%error, route = %route.prefix, suppressed, "upstream request failed");
                }
                Forwarded::Unreachable
            }
            Ok(Ok(answer)) => {
                let (mut parts, body) = answer.into_parts();
                headers::prepare_client_headers(&mut parts.headers);
                Forwarded::Answer(Response::from_parts(
                    parts,
                    body.map_err(BoxError::from).boxed(),
                ))
            }
        }
    }
}

enum Forwarded {
    Answer(Response<Body>),
    Unreachable,
    /// TLS to the upstream failed: its certificate was not trusted or not for its name, or the handshake
    /// broke.
    UntrustedUpstream,
    TimedOut,
    /// A body without a declared length grew past the limit while it was being forwarded.
    TooLarge,
    /// The client's body broke its framing (or the client went away) while it was being forwarded.
    BadClientBody,
}

/// An error reading the client's request body.
#[derive(Debug, thiserror::Error)]
#[error("request body: {0}")]
struct ClientBodyError(hyper::Error);

fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.is::<E>() {
            return true;
        }
        cause = current.source();
    }
    false
}

/// The units of an admitted request, given back when it ends before it is settled: the client went away
/// (hyper drops the request's future) or the gateway answered without an upstream answer to charge for.
struct ChargeGuard<'a> {
    backends: &'a Backends,
    customer_id: &'a str,
    admission_id: &'a str,
    settled: bool,
}

impl ChargeGuard<'_> {
    async fn refund_now(&mut self) {
        // Settled only once the refund is out of our hands: if this future is dropped meanwhile, the guard
        // refunds again (refunds are idempotent by request id).
        self.backends
            .refund(self.customer_id, self.admission_id)
            .await;
        self.settled = true;
    }
}

impl Drop for ChargeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.backends
                .refund_later(self.customer_id, self.admission_id);
        }
    }
}

static USAGE_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static UPSTREAM_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static UPSTREAM_TLS_FAILED: telemetry::LogLimit =
    telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static DEGRADED_PASS: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);

/// `Forwarding` with owned strings, so it can outlive the request it was read from.
struct OwnedForwarding {
    scheme: headers::Scheme,
    client_ip: std::net::IpAddr,
    forwarded_for: String,
    host: Option<String>,
    customer_id: String,
    plan_code: String,
    key_source: KeySource,
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    text: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Returns the client's `X-Request-Id` when it is a sane one, otherwise a fresh UUID.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(headers::REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            !id.is_empty() && id.len() <= 128 && id.bytes().all(|byte| byte.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

/// Refuses framing a proxy could read differently from the upstream (request smuggling), and transfer
/// codings other than a single `chunked`, which the gateway would otherwise forward decoded as plain
/// chunked, silently dropping the coding.
fn check_framing(headers: &HeaderMap) -> Result<(), (Code, &'static str)> {
    const TWO_WAYS: &str = "Both Content-Length and Transfer-Encoding were sent; send only one.";
    if headers.contains_key(crate::framing::AMBIGUOUS_MARK) {
        return Err((Code::BadRequest, TWO_WAYS));
    }
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !lengths.is_empty() && headers.contains_key(header::TRANSFER_ENCODING) {
        return Err((Code::BadRequest, TWO_WAYS));
    }
    if lengths.len() > 1 {
        return Err((
            Code::BadRequest,
            "Content-Length was sent more than once; send it once.",
        ));
    }
    if let Some(length) = lengths.first() {
        let valid = length
            .to_str()
            .is_ok_and(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()));
        if !valid {
            return Err((
                Code::BadRequest,
                "Content-Length must be a non-negative integer.",
            ));
        }
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|coding| !coding.is_empty());
        match (codings.next(), codings.next()) {
            (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => {}
            (None, _) => {
                return Err((Code::BadRequest, "Transfer-Encoding was sent empty."));
            }
            _ => {
                return Err((
                    Code::UnsupportedTransferCoding,
                    "Only `Transfer-Encoding: chunked` is accepted; send compressed bodies with \
                     Content-Encoding instead.",
                ));
            }
        }
    }
    Ok(())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Builds the IETF `RateLimit-Policy` and `RateLimit` headers (draft 10 syntax) for the period quota.
fn rate_limit_headers(
    limits: &billing_pb::Limits,
    decision: &usage_pb::AdmitResponse,
    period_seconds: Option<i64>,
) -> (HeaderValue, HeaderValue) {
    let reset_seconds = decision
        .quota_resets_at
        .as_ref()
        .map(|reset| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or(0);
            u64::try_from(reset.seconds)
                .unwrap_or(0)
                .saturating_sub(now)
        })
        .unwrap_or(0);
    let remaining = (decision.quota_limit - decision.quota_used).max(0);
    let window = match (&decision.quota_resets_at, period_seconds) {
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
    (
        HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("\"quota\"")),
        HeaderValue::from_str(&limit).unwrap_or_else(|_| HeaderValue::from_static("\"quota\"")),
    )
}

fn rfc3339(timestamp: &prost_types::Timestamp) -> Option<String> {
    let instant = time::OffsetDateTime::from_unix_timestamp(timestamp.seconds).ok()?;
    instant
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn count_backend_error(backend: &'static str, error: &BackendError) {
    let kind = match error {
        BackendError::CircuitOpen => "circuit_open",
        BackendError::Failed(status) if status.code() == tonic::Code::DeadlineExceeded => {
            "deadline"
        }
        BackendError::Failed(_) => "failed",
    };
    metrics::counter!("paygate_gateway_backend_errors_total", "backend" => backend, "kind" => kind)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(
            check_framing(&headers(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ]))
            .is_err()
        );
        assert!(
            check_framing(&headers(&[
                ("content-length", "5"),
                ("content-length", "5")
            ]))
            .is_err()
        );
        assert!(check_framing(&headers(&[("content-length", "+5")])).is_err());
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", " Chunked ")])).is_ok());
    }

    #[test]
    fn a_transfer_coding_other_than_a_single_chunked_is_not_supported() {
        for codings in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked, chunked")],
        ] {
            assert_eq!(
                check_framing(&headers(codings)).map_err(|(code, _)| code),
                Err(Code::UnsupportedTransferCoding),
                "{codings:?}"
            );
        }
        assert_eq!(
            check_framing(&headers(&[("transfer-encoding", " , ")])).map_err(|(code, _)| code),
            Err(Code::BadRequest)
        );
    }

    #[test]
    fn a_sane_client_request_id_is_kept_and_anything_else_replaced() {
        assert_eq!(
            request_id(&headers(&[("x-request-id", "abc-123")])),
            "abc-123"
        );
        assert_ne!(
            request_id(&headers(&[("x-request-id", "has space")])),
            "has space"
        );
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }
}
