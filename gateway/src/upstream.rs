//! Forwarding: a decided request goes to its route's upstream and the answer's head comes back, or the
//! reason none did. Bodies stream both ways.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Request, Response, header, request::Parts};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::{
    client_ip::Cidr,
    entitlements::Entitlement,
    headers::{self, Forwarding, KeySource, Scheme},
    proxy::{Body, BoxError},
    routes::Route,
};

/// Why the upstream gave no answer to forward.
#[derive(Debug)]
pub enum UpstreamFailure {
    Unreachable,
    /// TLS to the upstream failed: its certificate was not trusted or not for its name, or the handshake
    /// broke.
    Untrusted,
    TimedOut,
    /// A body without a declared length grew past the limit while it was being forwarded.
    TooLarge,
    /// The client's body broke its framing (or the client went away) while it was being forwarded.
    BadClientBody,
}

/// What the upstream is told about the caller, read from the request before its head is handed on.
pub struct Caller {
    scheme: Scheme,
    client_ip: IpAddr,
    forwarded_for: String,
    host: Option<String>,
    customer_id: String,
    plan_code: String,
    key_source: KeySource,
}

impl Caller {
    /// Returns the caller of the request with head `parts`, which came from `peer`; `trusted_proxies` may
    /// name the client's address for it.
    pub fn new(
        parts: &Parts,
        peer: SocketAddr,
        trusted_proxies: &[Cidr],
        entitlement: &Entitlement,
        key_source: KeySource,
    ) -> Self {
        let address = crate::client_ip::client_address(peer.ip(), &parts.headers, trusted_proxies);
        Self {
            scheme: parts
                .extensions
                .get::<Scheme>()
                .copied()
                .unwrap_or(Scheme::Http),
            client_ip: address.client,
            forwarded_for: address.forwarded_for,
            // HTTP/2 clients name the host in `:authority`, which hyper keeps in the URI.
            host: parts
                .headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .or_else(|| parts.uri.authority().map(|authority| authority.as_str()))
                .map(str::to_owned),
            customer_id: entitlement.customer_id.clone(),
            plan_code: entitlement.plan_code.clone(),
            key_source,
        }
    }
}

/// Sends `request` to `route`'s upstream as `caller`'s, and returns the answer's head with its body
/// streaming, hop-by-hop headers removed. A body longer than `max_body_bytes` is cut off (`TooLarge`).
pub async fn forward(
    request: Request<Incoming>,
    route: &Route,
    caller: &Caller,
    request_id: &str,
    max_body_bytes: u64,
) -> Result<Response<Body>, UpstreamFailure> {
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
        return Err(UpstreamFailure::Unreachable);
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
            scheme: caller.scheme,
            client_ip: caller.client_ip,
            forwarded_for: &caller.forwarded_for,
            host: caller.host.as_deref(),
            customer_id: &caller.customer_id,
            plan_code: &caller.plan_code,
            key_source: caller.key_source,
        },
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        parts.headers.insert(headers::REQUEST_ID, id);
    }
    telemetry::traces::inject_into_headers(&telemetry::traces::current(), &mut parts.headers);
    let limit = usize::try_from(max_body_bytes).unwrap_or(usize::MAX);
    // Errors of the client's body are told apart from the upstream's: a body that breaks its framing (or
    // a client that went away mid-body) is the client's fault, not an upstream outage.
    let body = http_body_util::Limited::new(body.map_err(ClientBodyError), limit).boxed();
    let outgoing = Request::from_parts(parts, body);
    match tokio::time::timeout(route.timeout, route.client.request(outgoing)).await {
        Err(_) => Err(UpstreamFailure::TimedOut),
        Ok(Err(error)) if caused_by::<http_body_util::LengthLimitError>(&error) => {
            Err(UpstreamFailure::TooLarge)
        }
        Ok(Err(error)) if caused_by::<ClientBodyError>(&error) => {
            tracing::debug!(%error, route = %route.prefix, "client body broke off or broke its framing");
            Err(UpstreamFailure::BadClientBody)
        }
        Ok(Err(error)) if crate::tls::tls_failure(&error).is_some() => {
            if let Some(suppressed) = UPSTREAM_TLS_FAILED.event()
                && let Some(tls) = crate::tls::tls_failure(&error)
            {
                tracing::warn!(error = %tls, route = %route.prefix, upstream = %route.upstream_origin, suppressed, "upstream TLS failed (its certificate or the handshake)");
            }
            Err(UpstreamFailure::Untrusted)
        }
        Ok(Err(error)) => {
            if let Some(suppressed) = UPSTREAM_FAILED.event() {
                tracing::warn!(%error, route = %route.prefix, suppressed, "upstream request failed");
            }
            Err(UpstreamFailure::Unreachable)
        }
        Ok(Ok(answer)) => {
            let (mut parts, body) = answer.into_parts();
            headers::prepare_client_headers(&mut parts.headers);
            Ok(Response::from_parts(
                parts,
                body.map_err(BoxError::from).boxed(),
            ))
        }
    }
}

static UPSTREAM_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static UPSTREAM_TLS_FAILED: telemetry::LogLimit =
    telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);

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
