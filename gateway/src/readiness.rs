//! Readiness (`/_paygate/ready`, DESIGN §8): whether this gateway can serve paid requests now — routes
//! loaded, and billing and usage answering with the service token accepted.
//!
//! A background check asks both every `CHECK_INTERVAL` with a cheap authenticated read (billing:
//! `GetCreditBalance` of the nil customer, answered NOT_FOUND; usage: `GetUsage` of the nil customer,
//! answered with zeros), so a refused service token and a backend whose database is down are told apart from an unreachable
//! one. Readiness requests read the last result and the breakers' state: a probe costs no backend call.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};

use proto::{billing::v1 as billing_pb, usage::v1 as usage_pb};

use crate::backends::Backends;

/// How often billing and usage are asked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one check waits for its answer.
const CHECK_DEADLINE: Duration = Duration::from_secs(1);
/// The customer and subscription of usage's check: no real one has the nil UUID.
const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Why one dependency is not ready; `None` when it is.
type Finding = Option<String>;

/// What the last check found, per backend, shared by the checker and the request path.
pub struct Readiness {
    findings: RwLock<Arc<Findings>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Findings {
    billing: Finding,
    usage: Finding,
    shutting_down: bool,
}

/// The answer to one readiness request.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// True when every dependency is ready.
    pub ready: bool,
    /// The JSON body: `{"ready":…,"routes":N,"billing":"ready"|why,"usage":"ready"|why}`.
    pub body: String,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Returns readiness before the first check: not ready.
    pub fn new() -> Self {
        let unchecked = Some("not checked yet".to_owned());
        Self {
            findings: RwLock::new(Arc::new(Findings {
                billing: unchecked.clone(),
                usage: unchecked,
                shutting_down: false,
            })),
        }
    }

    /// Returns the readiness answer for a gateway with `routes` routes loaded and `backends`' breakers in
    /// their current state.
    pub fn report(&self, routes: usize, backends: &Backends) -> Report {
        let findings = self.current();
        let billing = findings.billing.clone().or_else(|| {
            backends
                .billing_breaker_open()
                .then(|| "breaker open: recent calls failed".to_owned())
        });
        let usage = findings.usage.clone().or_else(|| {
            backends
                .usage_breaker_open()
                .then(|| "breaker open: recent calls failed".to_owned())
        });
        let routes_finding = (routes == 0).then(|| "no routes loaded".to_owned());
        let ready = billing.is_none()
            && usage.is_none()
            && routes_finding.is_none()
            && !findings.shutting_down;
        let mut body = serde_json::json!({
            "ready": ready,
            "routes": routes,
            "billing": billing.as_deref().unwrap_or("ready"),
            "usage": usage.as_deref().unwrap_or("ready"),
        });
        if findings.shutting_down {
            body["gateway"] = serde_json::Value::from("shutting down");
        }
        Report {
            ready,
            body: body.to_string(),
        }
    }

    /// Marks the gateway not ready for good: it is draining, and load balancers should stop sending.
    pub fn shutting_down(&self) {
        let mut findings = (*self.current()).clone();
        findings.shutting_down = true;
        self.replace(findings);
    }

    fn current(&self) -> Arc<Findings> {
        self.findings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn replace(&self, findings: Findings) {
        *self
            .findings
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(findings);
    }

    /// Records one check's findings, logging each backend whose readiness changed (one line per change).
    fn record(&self, billing: Finding, usage: Finding) {
        let before = self.current();
        for (backend, was, now) in [
            ("billing", &before.billing, &billing),
            ("usage", &before.usage, &usage),
        ] {
            if was == now {
                continue;
            }
            match now {
                Some(why) => tracing::warn!(backend, reason = %why, "gateway not ready"),
                None => tracing::info!(backend, "backend ready"),
            }
        }
        self.replace(Findings {
            billing,
            usage,
            shutting_down: before.shutting_down,
        });
    }
}

/// Checks billing and usage every `CHECK_INTERVAL` until `stop` is cancelled, recording into `readiness`.
pub async fn check_continuously(
    readiness: Arc<Readiness>,
    backends: Backends,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (billing, usage) = tokio::join!(check_billing(&backends), check_usage(&backends));
        readiness.record(billing, usage);
    }
}

async fn check_billing(backends: &Backends) -> Finding {
    // Not `Resolve`: a probe every second would swell `Resolve` NOT_FOUND, the figure operators watch for
    // guessed keys. A balance read is as cheap, authenticated, and also reaches billing's database.
    let mut request = Request::new(billing_pb::GetCreditBalanceRequest {
        customer_id: NIL_UUID.to_owned(),
    });
    request.set_timeout(CHECK_DEADLINE);
    let answer = tokio::time::timeout(
        CHECK_DEADLINE,
        backends.billing().get_credit_balance(request),
    )
    .await;
    match answer {
        Err(_) => Some(no_answer()),
        Ok(Ok(_)) => None,
        Ok(Err(status)) if status.code() == Code::NotFound => None,
        Ok(Err(status)) => Some(finding(&status)),
    }
}

async fn check_usage(backends: &Backends) -> Finding {
    let mut request = Request::new(usage_pb::GetUsageRequest {
        customer_id: NIL_UUID.to_owned(),
        subscription_id: NIL_UUID.to_owned(),
        period_start: Some(prost_types::Timestamp::default()),
    });
    request.set_timeout(CHECK_DEADLINE);
    let answer = tokio::time::timeout(CHECK_DEADLINE, backends.usage().get_usage(request)).await;
    match answer {
        Err(_) => Some(no_answer()),
        Ok(Ok(_)) => None,
        Ok(Err(status)) => Some(finding(&status)),
    }
}

fn no_answer() -> String {
    format!(
        "unreachable: no answer within {} ms",
        CHECK_DEADLINE.as_millis()
    )
}

/// Says why a check's call failed. A status made on this side (it carries the transport error as its
/// source) means the backend could not be reached; one the backend sent says what the backend thinks.
fn finding(status: &Status) -> String {
    match status.code() {
        Code::Unauthenticated => "service token refused".to_owned(),
        _ if std::error::Error::source(status).is_some() => {
            format!("unreachable: {}", status.message())
        }
        Code::Unavailable => format!("not serving: {}", status.message()),
        code => format!("check failed: {code:?}: {}", status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_token_and_a_backend_without_its_database_are_told_apart() {
        let refused = Status::unauthenticated("missing or invalid bearer token");
        let down = Status::unavailable("billing database unavailable");

        assert_eq!(finding(&refused), "service token refused");
        assert_eq!(finding(&down), "not serving: billing database unavailable");
    }
}
