//! Header rules of the front door: where the API key is read from, what never reaches the upstream as the
//! client sent it, and the headers the gateway sets itself.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// Names the gateway sets on forwarded requests; whatever a client sends under them is dropped.
pub const CUSTOMER: HeaderName = HeaderName::from_static("paygate-customer");
pub const PLAN: HeaderName = HeaderName::from_static("paygate-plan");
/// Marks answers passed while billing or usage could not decide.
pub const DEGRADED: HeaderName = HeaderName::from_static("paygate-degraded");
/// Warns on answers served while a payment is past due but inside grace.
pub const PAYMENT_WARNING: HeaderName = HeaderName::from_static("paygate-payment-warning");
pub const CREDITS_REMAINING: HeaderName = HeaderName::from_static("paygate-credits-remaining");
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// Client-address headers some CDNs and proxies set; never trusted from a client, never forwarded.
const CLIENT_ADDRESS_CLAIMS: [&str; 3] = ["true-client-ip", "x-client-ip", "cf-connecting-ip"];
pub const RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `proxy-connection` and `keep-alive`): they
/// describe one connection and never travel further.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where the caller put their API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Authorization,
    ApiKeyHeader,
}

/// Returns the API key a request carries, and where: `Authorization: Bearer <key>` first, then
/// `X-API-Key`. `None` when neither is present (a non-Bearer `Authorization` is not a key).
pub fn api_key(headers: &HeaderMap) -> Option<(&str, KeySource)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty());
    if let Some(key) = bearer {
        return Some((key, KeySource::Authorization));
    }
    headers
        .get(API_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(|key| (key, KeySource::ApiKeyHeader))
}

/// Tells whether `key` has the shape and checksum of a paygate key: one that does not is unknown without
/// asking billing.
pub fn is_well_formed_key(key: &str) -> bool {
    proto::api_key::is_well_formed(key)
}

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The scheme a client reached the gateway with; the listener puts it in each request's extensions, so
/// the upstream is told the original scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// Returns the scheme as written in `X-Forwarded-Proto` and `Forwarded: proto=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// What the gateway knows about the caller when forwarding.
pub struct Forwarding<'a> {
    /// The scheme the client used toward the gateway.
    pub scheme: Scheme,
    /// The client's address as determined (the peer, or the hop a trusted proxy reported).
    pub client_ip: IpAddr,
    /// The `X-Forwarded-For` chain to send (see `client_ip::client_address`).
    pub forwarded_for: &'a str,
    /// The `Host` the client asked for, if it sent one.
    pub host: Option<&'a str>,
    pub customer_id: &'a str,
    pub plan_code: &'a str,
    /// Where the API key came from, so it is removed.
    pub key_source: KeySource,
}

/// Prepares a client's request headers for the upstream: hop-by-hop headers and the API key go, identity
/// headers are set by the gateway alone (never trusted from the client), and the forwarding headers
/// describe this hop only.
pub fn prepare_upstream_headers(headers: &mut HeaderMap, forwarding: &Forwarding<'_>) {
    strip_hop_by_hop(headers);
    if forwarding.key_source == KeySource::Authorization {
        headers.remove(header::AUTHORIZATION);
    }
    headers.remove(API_KEY);
    for name in [
        &CUSTOMER,
        &PLAN,
        &FORWARDED_FOR,
        &FORWARDED_PROTO,
        &FORWARDED_HOST,
        &header::FORWARDED,
        &REAL_IP,
    ] {
        headers.remove(name);
    }
    for name in CLIENT_ADDRESS_CLAIMS {
        headers.remove(name);
    }
    let client = forwarding.client_ip.to_string();
    insert(headers, CUSTOMER, forwarding.customer_id);
    insert(headers, PLAN, forwarding.plan_code);
    insert(headers, FORWARDED_FOR, forwarding.forwarded_for);
    insert(headers, REAL_IP, &client);
    insert(headers, FORWARDED_PROTO, forwarding.scheme.as_str());
    let node = match forwarding.client_ip {
        IpAddr::V4(_) => client.clone(),
        IpAddr::V6(_) => format!("\"[{client}]\""),
    };
    let mut forwarded = format!("for={node};proto={}", forwarding.scheme.as_str());
    if let Some(host) = forwarding.host.filter(|host| is_token_safe(host)) {
        insert(headers, FORWARDED_HOST, host);
        forwarded.push_str(";host=");
        forwarded.push_str(host);
    }
    insert(headers, header::FORWARDED, &forwarded);
}

fn is_token_safe(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-.:[]".contains(&byte))
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Removes hop-by-hop headers from an upstream's response before it goes to the client.
pub fn prepare_client_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn the_key_comes_from_a_bearer_authorization_first_then_x_api_key() {
        let both = headers(&[("authorization", "Bearer abc"), ("x-api-key", "def")]);
        let only_header = headers(&[("x-api-key", " def ")]);
        let basic = headers(&[("authorization", "Basic Zm9v")]);

        assert_eq!(api_key(&both), Some(("abc", KeySource::Authorization)));
        assert_eq!(
            api_key(&only_header),
            Some(("def", KeySource::ApiKeyHeader))
        );
        assert_eq!(api_key(&basic), None);
        assert_eq!(api_key(&headers(&[("authorization", "bearer   ")])), None);
    }

    #[test]
    fn nothing_the_client_sends_as_hop_by_hop_identity_or_key_reaches_the_upstream() {
        let mut sent = headers(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("authorization", "Bearer pg_live_key"),
            ("x-api-key", "pg_live_other"),
            ("paygate-customer", "someone-else"),
            ("Paygate-Plan", "enterprise"),
            ("x-forwarded-for", "10.9.9.9"),
            ("forwarded", "for=10.9.9.9"),
            ("x-real-ip", "10.9.9.9"),
            ("true-client-ip", "10.9.9.9"),
            ("x-client-ip", "10.9.9.9"),
            ("cf-connecting-ip", "10.9.9.9"),
            ("accept", "application/json"),
        ]);

        prepare_upstream_headers(
            &mut sent,
            &Forwarding {
                scheme: Scheme::Http,
                client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                forwarded_for: "127.0.0.1",
                host: Some("api.example.com"),
                customer_id: "cus_1",
                plan_code: "starter",
                key_source: KeySource::Authorization,
            },
        );

        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "authorization",
            "x-api-key",
            "true-client-ip",
            "x-client-ip",
            "cf-connecting-ip",
        ] {
            assert!(!sent.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(
            sent.get_all("x-real-ip").iter().collect::<Vec<_>>(),
            ["127.0.0.1"]
        );
        assert_eq!(
            sent.get_all("paygate-customer").iter().collect::<Vec<_>>(),
            ["cus_1"]
        );
        assert_eq!(
            sent.get_all("paygate-plan").iter().collect::<Vec<_>>(),
            ["starter"]
        );
        assert_eq!(
            sent.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["127.0.0.1"]
        );
        assert_eq!(
            sent["forwarded"],
            "for=127.0.0.1;proto=http;host=api.example.com"
        );
        assert_eq!(sent["accept"], "application/json");
    }

    #[test]
    fn a_non_key_authorization_is_kept_when_the_key_came_in_x_api_key_over_https() {
        let mut sent = headers(&[
            ("authorization", "Basic dXNlcg=="),
            ("x-api-key", "pg_live_key"),
        ]);

        prepare_upstream_headers(
            &mut sent,
            &Forwarding {
                scheme: Scheme::Https,
                client_ip: "::1".parse().expect("ip"),
                forwarded_for: "::1",
                host: None,
                customer_id: "c",
                plan_code: "p",
                key_source: KeySource::ApiKeyHeader,
            },
        );

        assert_eq!(sent["authorization"], "Basic dXNlcg==");
        assert!(!sent.contains_key("x-api-key"));
        assert_eq!(sent["forwarded"], "for=\"[::1]\";proto=https");
        assert_eq!(sent["x-forwarded-proto"], "https");
    }
}
