//! `Refusal`: a request the gateway answers itself instead of forwarding, and the one place such an answer
//! is built — the problem+json body, `Retry-After`, the rate-limit headers and whether the connection
//! closes after it.

use http::{HeaderValue, Response, StatusCode, header};

use crate::{
    headers,
    problem::{Actions, Code, Money, Problem},
    proxy::{Body, full},
    routes::RoutesFile,
    upstream::UpstreamFailure,
};

/// An answer the gateway gives instead of the upstream's: a problem code with what the body and headers
/// say about it.
#[derive(Debug)]
pub struct Refusal(Box<Said>);

/// What a refusal says; boxed, so that results carrying a refusal stay small on the success path.
#[derive(Debug)]
struct Said {
    code: Code,
    detail: Option<String>,
    facts: Facts,
    retry_after: Option<u64>,
    rate_limit: Option<RateLimit>,
    close_connection: bool,
}

/// The problem body's extension members a refusal knows; `None` members are left out.
#[derive(Debug, Default)]
pub struct Facts {
    pub plan: Option<String>,
    pub limit: Option<i64>,
    pub used: Option<i64>,
    /// RFC 3339, UTC, whole seconds.
    pub resets_at: Option<String>,
    /// Seconds, as in `Retry-After`.
    pub retry_after: Option<u64>,
    pub balance: Option<Money>,
}

/// The IETF `RateLimit-Policy` and `RateLimit` header values of one decision.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub policy: HeaderValue,
    pub limit: HeaderValue,
}

impl RateLimit {
    /// Sets both headers on `answer`.
    pub fn insert_into(self, answer: &mut http::HeaderMap) {
        answer.insert(headers::RATE_LIMIT_POLICY, self.policy);
        answer.insert(headers::RATE_LIMIT, self.limit);
    }
}

impl Refusal {
    /// Returns a refusal with `code`'s default detail and nothing else.
    pub fn new(code: Code) -> Self {
        Self(Box::new(Said {
            code,
            detail: None,
            facts: Facts::default(),
            retry_after: None,
            rate_limit: None,
            close_connection: false,
        }))
    }

    /// Returns the refusal with `detail` in place of the code's default.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.0.detail = Some(detail.into());
        self
    }

    /// Returns the refusal with these extension members in its body.
    pub fn with_facts(mut self, facts: Facts) -> Self {
        self.0.facts = facts;
        self
    }

    /// Returns the refusal with a `Retry-After` of `seconds`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.0.retry_after = Some(seconds);
        self
    }

    /// Returns the refusal with the rate-limit headers of its decision.
    pub fn with_rate_limit(mut self, rate_limit: RateLimit) -> Self {
        self.0.rate_limit = Some(rate_limit);
        self
    }

    /// Returns the refusal closing the connection after it (HTTP/1): the rest of the connection's bytes
    /// can no longer be trusted to mean what they seem.
    pub fn closing_connection(mut self) -> Self {
        self.0.close_connection = true;
        self
    }

    /// Returns the problem code.
    pub fn code(&self) -> Code {
        self.0.code
    }

    /// Builds the answer: problem+json with `links`' type base and actions, never cached, with
    /// `WWW-Authenticate` on a 401.
    pub fn into_response(self, links: &RoutesFile) -> Response<Body> {
        let said = *self.0;
        let mut problem = Problem::new(said.code, &links.problem_base_url);
        if let Some(detail) = said.detail {
            problem.detail = detail;
        }
        let Facts {
            plan,
            limit,
            used,
            resets_at,
            retry_after,
            balance,
        } = said.facts;
        problem.plan = plan;
        problem.limit = limit;
        problem.used = used;
        problem.resets_at = resets_at;
        problem.retry_after = retry_after;
        problem.balance = balance;
        problem.actions = actions(said.code, links);

        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(full(problem.to_json()));
        *response.status_mut() = status;
        let answer = response.headers_mut();
        answer.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        answer.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::UNAUTHORIZED {
            answer.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"paygate\", error=\"invalid_token\""),
            );
        }
        if let Some(seconds) = said.retry_after {
            answer.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(rate_limit) = said.rate_limit {
            rate_limit.insert_into(answer);
        }
        if said.close_connection {
            answer.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<UpstreamFailure> for Refusal {
    fn from(failure: UpstreamFailure) -> Self {
        match failure {
            UpstreamFailure::Unreachable => Self::new(Code::UpstreamUnavailable),
            UpstreamFailure::Untrusted => Self::new(Code::UpstreamTls),
            UpstreamFailure::TimedOut => Self::new(Code::UpstreamTimeout),
            UpstreamFailure::TooLarge => Self::new(Code::PayloadTooLarge),
            UpstreamFailure::BadClientBody => Self::new(Code::BadRequest)
                .with_detail(
                    "The request body's framing was malformed (for example a bad chunk size); it was \
                     not served and nothing was charged.",
                )
                .closing_connection(),
        }
    }
}

/// Returns where a caller refused with `code` can fix their account, if anywhere.
fn actions(code: Code, links: &RoutesFile) -> Option<Actions> {
    let top_up = matches!(code, Code::CreditsExhausted | Code::QuotaExhausted)
        .then(|| links.top_up_url.clone())
        .flatten();
    let upgrade = matches!(
        code,
        Code::QuotaExhausted
            | Code::PlanExcludesRoute
            | Code::SubscriptionRequired
            | Code::SubscriptionInactive
    )
    .then(|| links.upgrade_url.clone())
    .flatten();
    (top_up.is_some() || upgrade.is_some()).then_some(Actions { top_up, upgrade })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> RoutesFile {
        toml::from_str(
            r#"
top_up_url = "https://example.com/top-up"
routes = []
"#,
        )
        .expect("routes file")
    }

    #[test]
    fn a_refusal_answers_with_its_problem_and_the_headers_it_carries() {
        let refusal = Refusal::new(Code::CreditsExhausted)
            .with_retry_after(7)
            .closing_connection();

        let response = refusal.into_response(&links());

        assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
        let answer = response.headers();
        assert_eq!(answer[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(answer[header::CACHE_CONTROL], "no-store");
        assert_eq!(answer[header::RETRY_AFTER], "7");
        assert_eq!(answer[header::CONNECTION], "close");
        assert!(!answer.contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn an_unauthorized_refusal_names_the_bearer_scheme() {
        let response = Refusal::new(Code::InvalidApiKey).into_response(&links());

        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        assert!(!response.headers().contains_key(header::CONNECTION));
    }

    #[test]
    fn a_client_body_that_broke_its_framing_closes_the_connection() {
        let refusal = Refusal::from(UpstreamFailure::BadClientBody);

        assert_eq!(refusal.code(), Code::BadRequest);
        assert!(refusal.0.close_connection);
    }
}
