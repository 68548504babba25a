//! The path of one request: `handle` answers the gateway's own pages, and every other request goes
//! decide (`decision`) → forward (`upstream`) → settle; a refusal becomes its answer in `error`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    backends::Backends,
    decision::{self, Paid, Terms, Verdict},
    entitlements::EntitlementCache,
    error::Refusal,
    headers,
    problem::Code,
    routes::{Route, RouteTable, RoutesFile},
    stats::{CustomerStats, RequestRecord},
    upstream::{self, Caller, UpstreamFailure},
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
    /// This gateway's leases; `None` with `GATEWAY_LEASES=off` (every request admitted by usage).
    pub lessor: Option<Arc<crate::lessor::Lessor>>,
}

/// Returns a body of `bytes`, sent whole.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The `code` label and stats key of forwarded answers.
const FORWARDED: &str = "forwarded";

/// How a request was answered.
enum Answered {
    /// One of the gateway's own pages: not a decision, not counted.
    Page(Response<Body>),
    Forwarded(Response<Body>),
    Refused(Refusal),
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
        let answered = match self.own_page(request.uri().path()) {
            Some(page) => page,
            None => self
                .decide_forward_settle(request, route, peer, &request_id, started, &mut record)
                .instrument(span.clone())
                .await
                .map_or_else(Answered::Refused, Answered::Forwarded),
        };
        let (mut response, code) = match answered {
            Answered::Page(page) => (page, None),
            Answered::Forwarded(answer) => (answer, Some(FORWARDED)),
            Answered::Refused(refusal) => {
                let code = refusal.code().as_str();
                (refusal.into_response(&self.file), Some(code))
            }
        };
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(headers::REQUEST_ID, id);
        }
        if let Some(code) = code {
            span.record("code", code);
            if let Some(customer_id) = record.customer_id.take() {
                self.stats.record(customer_id, code, &record);
            }
            count_answer(route, code, response.status(), started.elapsed());
        }
        Ok(response)
    }

    /// Returns the gateway's own answer at `path` (health, readiness, the problem pages); `None` for
    /// every other path.
    fn own_page(&self, path: &str) -> Option<Answered> {
        if path == HEALTH_PATH {
            return Some(Answered::Page(text_response(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ok\n",
            )));
        }
        if path == READY_PATH {
            return Some(Answered::Page(self.ready_response()));
        }
        let code = path.strip_prefix(PROBLEMS_PATH)?;
        Some(match Code::parse(code) {
            Some(code) => Answered::Page(text_response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::problem::page(code),
            )),
            None => Answered::Refused(Refusal::new(Code::RouteNotFound)),
        })
    }

    async fn decide_forward_settle(
        &self,
        request: Request<Incoming>,
        route: Option<&Route>,
        peer: SocketAddr,
        request_id: &str,
        started: Instant,
        record: &mut RequestRecord,
    ) -> Result<Response<Body>, Refusal> {
        let (parts, body) = request.into_parts();
        let verdict = self.decide(&parts, route, record).await?;
        let caller = Caller::new(
            &parts,
            peer,
            &self.file.trusted_proxies,
            &verdict.entitlement,
            verdict.key_source,
        );
        if matches!(verdict.terms, Terms::Paid(_)) {
            metrics::histogram!("paygate_gateway_decision_duration_seconds")
                .record(started.elapsed());
        }
        let asked_upstream = Instant::now();
        let forwarded = upstream::forward(
            Request::from_parts(parts, body),
            verdict.route,
            &caller,
            request_id,
            self.file.limits.max_body_bytes,
        )
        .await;
        settle(verdict, forwarded, asked_upstream.elapsed(), record).await
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
}

/// Settles a forwarded request on its verdict's terms and returns its answer: a paid request keeps its
/// units only for an upstream answer that is not a server error, and its answer tells the customer their
/// allowance; a degraded pass is marked so.
async fn settle(
    verdict: Verdict<'_>,
    forwarded: Result<Response<Body>, UpstreamFailure>,
    upstream_took: Duration,
    record: &mut RequestRecord,
) -> Result<Response<Body>, Refusal> {
    let Paid {
        outcome,
        rate_limit,
        charge,
    } = match verdict.terms {
        Terms::Degraded => {
            let mut answer = forwarded?;
            answer
                .headers_mut()
                .insert(headers::DEGRADED, HeaderValue::from_static("true"));
            return Ok(answer);
        }
        Terms::Paid(paid) => *paid,
    };
    metrics::histogram!("paygate_gateway_upstream_duration_seconds", "route" => metrics::SharedString::from(verdict.route.label.clone()))
        .record(upstream_took);
    let served = match &forwarded {
        Ok(answer) => {
            record.upstream = Some((answer.status().as_u16(), upstream_took));
            !answer.status().is_server_error()
        }
        Err(_) => false,
    };
    if !served {
        record.units = 0;
        record.credits_micros = 0;
    }
    charge.settle(served).await;
    let mut answer = forwarded?;
    decision::insert_allowance_headers(
        answer.headers_mut(),
        &verdict.entitlement,
        &outcome,
        rate_limit,
    );
    Ok(answer)
}

/// Counts a decided request in the request metrics: `code` is its problem code, or `forwarded`.
fn count_answer(route: Option<&Route>, code: &'static str, status: StatusCode, took: Duration) {
    let route = route.map_or(metrics::SharedString::const_str("none"), |route| {
        metrics::SharedString::from(route.label.clone())
    });
    metrics::counter!(
        "paygate_gateway_requests_total",
        "route" => route.clone(),
        "code" => code,
        "status" => status.as_u16().to_string(),
    )
    .increment(1);
    metrics::histogram!("paygate_gateway_request_duration_seconds", "route" => route).record(took);
    if code != FORWARDED {
        metrics::histogram!("paygate_gateway_decision_duration_seconds").record(took);
    }
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
