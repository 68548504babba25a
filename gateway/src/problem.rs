//! The answers the gateway produces itself: RFC 9457 problem bodies (DESIGN §3), one stable `code` each,
//! and the short human page served for each code at `/problems/<code>`.

use serde::Serialize;

/// Every reason the gateway answers a request itself. Adding one is a contract change (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    BadRequest,
    MissingApiKey,
    InvalidApiKey,
    SubscriptionRequired,
    SubscriptionInactive,
    PaymentPastDue,
    QuotaExhausted,
    CreditsExhausted,
    PlanExcludesRoute,
    RouteNotFound,
    PayloadTooLarge,
    RateLimited,
    HeadersTooLarge,
    UnsupportedTransferCoding,
    UpstreamUnavailable,
    UpstreamTimeout,
    BillingUnavailable,
    /// TLS to an `https://` upstream failed: its certificate was not trusted (`ca_file` or the system
    /// roots), named another host, or the handshake broke.
    UpstreamTls,
}

impl Code {
    /// Every code, in the order of DESIGN §3.
    pub const ALL: [Self; 18] = [
        Self::BadRequest,
        Self::MissingApiKey,
        Self::InvalidApiKey,
        Self::SubscriptionRequired,
        Self::SubscriptionInactive,
        Self::PaymentPastDue,
        Self::QuotaExhausted,
        Self::CreditsExhausted,
        Self::PlanExcludesRoute,
        Self::RouteNotFound,
        Self::PayloadTooLarge,
        Self::RateLimited,
        Self::HeadersTooLarge,
        Self::UnsupportedTransferCoding,
        Self::UpstreamUnavailable,
        Self::UpstreamTimeout,
        Self::BillingUnavailable,
        Self::UpstreamTls,
    ];

    /// Returns the machine-readable code, as in the `code` member.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::MissingApiKey => "missing_api_key",
            Self::InvalidApiKey => "invalid_api_key",
            Self::SubscriptionRequired => "subscription_required",
            Self::SubscriptionInactive => "subscription_inactive",
            Self::PaymentPastDue => "payment_past_due",
            Self::QuotaExhausted => "quota_exhausted",
            Self::CreditsExhausted => "credits_exhausted",
            Self::PlanExcludesRoute => "plan_excludes_route",
            Self::RouteNotFound => "route_not_found",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RateLimited => "rate_limited",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::BillingUnavailable => "billing_unavailable",
            Self::UpstreamTls => "upstream_tls",
        }
    }

    /// Parses a code as written in a `/problems/<code>` path (underscores or hyphens).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|code| code.as_str() == text || code.slug() == text)
    }

    /// Returns the code with hyphens, as the last segment of the `type` URI.
    pub fn slug(self) -> String {
        self.as_str().replace('_', "-")
    }

    /// Returns the HTTP status of answers with this code.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::MissingApiKey | Self::InvalidApiKey => 401,
            Self::SubscriptionRequired
            | Self::SubscriptionInactive
            | Self::PaymentPastDue
            | Self::QuotaExhausted
            | Self::CreditsExhausted => 402,
            Self::PlanExcludesRoute => 403,
            Self::RouteNotFound => 404,
            Self::PayloadTooLarge => 413,
            Self::RateLimited => 429,
            Self::HeadersTooLarge => 431,
            Self::UnsupportedTransferCoding => 501,
            Self::UpstreamUnavailable | Self::UpstreamTls => 502,
            Self::BillingUnavailable => 503,
            Self::UpstreamTimeout => 504,
        }
    }

    /// Returns the short human title.
    pub fn title(self) -> &'static str {
        match self {
            Self::BadRequest => "Bad request",
            Self::MissingApiKey => "API key required",
            Self::InvalidApiKey => "Invalid API key",
            Self::SubscriptionRequired => "Subscription required",
            Self::SubscriptionInactive => "Subscription inactive",
            Self::PaymentPastDue => "Payment past due",
            Self::QuotaExhausted => "Quota exhausted",
            Self::CreditsExhausted => "Credits exhausted",
            Self::PlanExcludesRoute => "Not included in your plan",
            Self::RouteNotFound => "Not found",
            Self::PayloadTooLarge => "Request body too large",
            Self::RateLimited => "Too many requests",
            Self::HeadersTooLarge => "Request headers too large",
            Self::UnsupportedTransferCoding => "Transfer coding not supported",
            Self::UpstreamUnavailable => "Upstream unavailable",
            Self::UpstreamTimeout => "Upstream timed out",
            Self::BillingUnavailable => "Temporarily unable to check your plan",
            Self::UpstreamTls => "Upstream certificate not trusted",
        }
    }

    /// Returns what the caller can do about it, for the human page (and the default `detail`).
    pub fn advice(self) -> &'static str {
        match self {
            Self::BadRequest => {
                "The request's framing was malformed or ambiguous (for example both Content-Length and \
                 Transfer-Encoding, or conflicting lengths). It was not forwarded. Send it again with one \
                 valid length or chunked encoding."
            }
            Self::MissingApiKey => {
                "Send your API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`."
            }
            Self::InvalidApiKey => {
                "The API key is not valid. Check that it was copied whole, or create a new key; revoked and \
                 expired keys stop working at once."
            }
            Self::SubscriptionRequired => {
                "Your account has no subscription. Choose a plan to start using the API."
            }
            Self::SubscriptionInactive => {
                "Your subscription was cancelled or has expired. Subscribe again to continue."
            }
            Self::PaymentPastDue => {
                "A payment is overdue and the grace period has ended. Pay the open invoice to continue."
            }
            Self::QuotaExhausted => {
                "Your plan's included requests for this period are used up. Wait for the period to reset \
                 (see `resets_at`) or upgrade your plan."
            }
            Self::CreditsExhausted => {
                "Your prepaid credits cannot cover this request. Top up your balance to continue."
            }
            Self::PlanExcludesRoute => {
                "This endpoint is not part of your plan. Upgrade to a plan that includes it."
            }
            Self::RouteNotFound => "There is no API at this path.",
            Self::PayloadTooLarge => {
                "The request body is larger than this API accepts. Nothing was charged."
            }
            Self::RateLimited => {
                "You are sending requests faster than your plan allows. Wait for the number of seconds in \
                 `Retry-After`, then retry; the `RateLimit` headers show your allowance."
            }
            Self::HeadersTooLarge => "The request's headers are too large or too many.",
            Self::UnsupportedTransferCoding => {
                "The request body was sent with a transfer coding other than plain `chunked` (for example \
                 `gzip, chunked`). It was not forwarded and nothing was charged. Send the body with \
                 `Content-Length` or `Transfer-Encoding: chunked` alone, and say how it is compressed with \
                 `Content-Encoding`."
            }
            Self::UpstreamUnavailable => {
                "The API behind this gateway could not be reached. Nothing was charged; retry later."
            }
            Self::UpstreamTimeout => {
                "The API behind this gateway did not answer in time. Nothing was charged; retry later."
            }
            Self::BillingUnavailable => {
                "The gateway cannot check your plan right now. Nothing was charged; retry after the number \
                 of seconds in `Retry-After`."
            }
            Self::UpstreamTls => {
                "The API behind this gateway could not be reached securely: its TLS certificate was not \
                 trusted or not issued for its name, or the TLS handshake failed. Nothing was charged. \
                 The API's operator has to fix this; retrying will not help until then."
            }
        }
    }
}

/// An amount of money as shown to callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Money {
    /// Decimal amount with two places (`"12.50"`), rounded down from micros.
    pub amount: String,
    pub currency: String,
}

impl Money {
    /// Formats `micros` of `currency` with two decimal places, never rounding up.
    pub fn from_micros(micros: i64, currency: &str) -> Self {
        let cents = micros.div_euclid(10_000);
        let sign = if cents < 0 { "-" } else { "" };
        let cents = cents.unsigned_abs();
        Self {
            amount: format!("{sign}{}.{:02}", cents / 100, cents % 100),
            currency: currency.to_owned(),
        }
    }
}

/// Where a caller can fix their account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Actions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_up: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
}

/// An RFC 9457 problem body with paygate's extension members. Members that are `None` are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<Money>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<Actions>,
}

impl Problem {
    /// Returns the problem for `code` with its default detail; `type` is `base` + `/` + the slug.
    pub fn new(code: Code, base: &str) -> Self {
        Self {
            kind: format!("{}/{}", base.trim_end_matches('/'), code.slug()),
            title: code.title(),
            status: code.status(),
            detail: code.advice().to_owned(),
            code: code.as_str(),
            plan: None,
            limit: None,
            used: None,
            resets_at: None,
            retry_after: None,
            balance: None,
            actions: None,
        }
    }

    /// Replaces the detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Serialises the body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// Returns the human page for `code`: a small, self-contained HTML document.
pub fn page(code: Code) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{status} {title}</title>\
         <meta name=\"viewport\" content=\"width=device-width\"></head>\n<body style=\"font-family:sans-serif;\
         max-width:40em;margin:3em auto;line-height:1.5\">\n<h1>{title}</h1>\n<p><strong>HTTP {status}</strong>, \
         code <code>{code}</code></p>\n<p>{advice}</p>\n<p>Programs: read the <code>code</code> member of the \
         <code>application/problem+json</code> body; it never changes meaning.</p>\n</body></html>\n",
        status = code.status(),
        title = code.title(),
        code = code.as_str(),
        advice = html_escape(code.advice()),
    )
}

fn html_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    let mut in_code = false;
    for character in text.chars() {
        match character {
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '&' => escaped.push_str("&amp;"),
            '`' => {
                escaped.push_str(if in_code { "</code>" } else { "<code>" });
                in_code = !in_code;
            }
            _ => escaped.push(character),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name_and_slug() {
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str()), Some(code));
            assert_eq!(Code::parse(&code.slug()), Some(code));
        }
        assert_eq!(Code::parse("teapot"), None);
    }

    #[test]
    fn statuses_follow_the_design_table() {
        let by_status = |status: u16| -> Vec<&str> {
            Code::ALL
                .into_iter()
                .filter(|code| code.status() == status)
                .map(Code::as_str)
                .collect()
        };

        assert_eq!(by_status(401), ["missing_api_key", "invalid_api_key"]);
        assert_eq!(
            by_status(402),
            [
                "subscription_required",
                "subscription_inactive",
                "payment_past_due",
                "quota_exhausted",
                "credits_exhausted"
            ]
        );
        assert_eq!(by_status(502), ["upstream_unavailable", "upstream_tls"]);
        assert_eq!(by_status(503), ["billing_unavailable"]);
    }

    #[test]
    fn a_problem_body_leaves_out_what_it_does_not_know() {
        let problem = Problem::new(Code::QuotaExhausted, "https://docs.example.com/problems/");

        let body: serde_json::Value = serde_json::from_slice(&problem.to_json()).expect("json");

        assert_eq!(
            body["type"],
            "https://docs.example.com/problems/quota-exhausted"
        );
        assert_eq!(body["status"], 402);
        assert_eq!(body["code"], "quota_exhausted");
        assert!(body.get("balance").is_none());
    }

    #[test]
    fn money_is_shown_with_two_places_rounded_down() {
        assert_eq!(Money::from_micros(12_345_678, "USD").amount, "12.34");
        assert_eq!(Money::from_micros(0, "USD").amount, "0.00");
        assert_eq!(Money::from_micros(5_000, "EUR").amount, "0.00");
    }

    #[test]
    fn pages_escape_markup_and_render_code_spans() {
        let html = page(Code::MissingApiKey);

        assert!(html.contains("<code>Authorization: Bearer &lt;key&gt;</code>"));
        assert!(html.contains("HTTP 401"));
    }
}
