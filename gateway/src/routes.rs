//! The routes file (`GATEWAY_CONFIG`, TOML): which path prefixes go to which upstream, at what price, and
//! how each route behaves when billing or usage is down; and the longest-prefix lookup over it.

use std::{
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

/// The routes file as written by an operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// Base of the `type` URI in problem bodies (`<base>/<code>`); default `/problems`, which this gateway
    /// serves itself.
    #[serde(default = "default_problem_base")]
    pub problem_base_url: String,
    /// Where a caller tops up credits, shown in 402 bodies as `actions.top_up`.
    #[serde(default)]
    pub top_up_url: Option<String>,
    /// Where a caller changes plan, shown in 402/403 bodies as `actions.upgrade`.
    #[serde(default)]
    pub upgrade_url: Option<String>,
    /// How long cached entitlements stay in force while billing or its change stream cannot be reached,
    /// in milliseconds (0: never); after that, requests of those keys get 503.
    #[serde(default = "default_entitlements_stale_for_ms")]
    pub entitlements_stale_for_ms: u64,
    /// Proxies in front of the gateway (addresses or CIDRs, e.g. `10.0.0.0/8`): a request from one of them
    /// has its `X-Forwarded-For` extended instead of replaced, and its client address read from it.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::client_ip::Cidr>,
    #[serde(default)]
    pub limits: RequestLimits,
    pub routes: Vec<RouteSpec>,
}

fn default_problem_base() -> String {
    "/problems".to_owned()
}

fn default_entitlements_stale_for_ms() -> u64 {
    30_000
}

impl RoutesFile {
    /// Returns how long cached entitlements stay in force while billing cannot be reached.
    pub fn entitlements_stale_for(&self) -> Duration {
        Duration::from_millis(self.entitlements_stale_for_ms)
    }
}

/// Bounds on what a client may send, and on the connections it sends over.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLimits {
    /// Largest request body forwarded, in bytes; larger ones get 413 before the body is read.
    pub max_body_bytes: u64,
    /// Most request headers accepted; more get 431.
    pub max_headers: usize,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// How long a client may take to send a whole request head, counted from the connection's first
    /// moment (or from the first byte of a later head on a kept-alive connection); HTTP/2's preface and
    /// first request count as the head. A connection past it is closed.
    pub header_read_timeout_ms: NonZeroU64,
    /// How long a connection with no request in progress stays open.
    pub idle_timeout_ms: NonZeroU64,
    /// Most connections open at once; a connection beyond is accepted and closed at once. Unset: below
    /// the process's open-files limit (see `connections::default_max_connections`).
    pub max_connections: Option<NonZeroUsize>,
    /// Most HTTP/2 streams in progress on one connection.
    pub max_concurrent_streams: NonZeroU32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_headers: 100,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: NonZeroU64::new(10_000).expect("nonzero"),
            idle_timeout_ms: NonZeroU64::new(60_000).expect("nonzero"),
            max_connections: None,
            max_concurrent_streams: NonZeroU32::new(100).expect("nonzero"),
        }
    }
}

/// What the gateway does on a route when billing or usage cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Answer 503 `billing_unavailable` (the default).
    #[default]
    Closed,
    /// Forward anyway, marked `Paygate-Degraded: true`, up to `open_budget` units per key per instance.
    Open,
}

/// One route as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Path prefix, matched on whole segments (`/v1` matches `/v1` and `/v1/x`, not `/v10`).
    pub prefix: String,
    /// Upstream base URL, `http://host:port` or `https://host:port`, with an optional path the request
    /// path is appended to.
    pub upstream: String,
    /// PEM file of the CA certificate(s) an `https://` upstream's certificate is verified against, instead
    /// of the system roots; relative to the gateway's working directory.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Units one request costs (default 1).
    #[serde(default = "default_price")]
    pub price: i64,
    /// A plan feature the caller's plan must have; none by default.
    #[serde(default)]
    pub feature: Option<String>,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// With `failure_mode = "open"`: units per key per gateway instance that may pass while degraded.
    #[serde(default)]
    pub open_budget: u32,
    /// How long the upstream may take to start answering (default 30 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_price() -> i64 {
    1
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// A checked route.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    /// The prefix as a metric label, shared so that labelling a request does not allocate.
    pub label: std::sync::Arc<str>,
    /// Scheme and authority of the upstream (`http://127.0.0.1:9000`, `https://api.example.com`).
    pub upstream_origin: String,
    /// Whether the upstream is `https://`.
    pub upstream_tls: bool,
    /// The client that forwards to the upstream, built with the file (shared by routes that trust the
    /// same CAs), so a route table read again carries the clients of its own file.
    pub client: crate::tls::UpstreamClient,
    /// Path the request path is appended to (empty or `/base`, never ending in `/`).
    pub upstream_base_path: String,
    pub price: i64,
    pub feature: Option<String>,
    pub failure_mode: FailureMode,
    pub open_budget: u32,
    pub timeout: Duration,
}

/// Why a routes file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("routes file is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("route `{prefix}`: {problem}")]
    Route { prefix: String, problem: String },
    #[error("the routes file defines no routes")]
    Empty,
}

/// The routes, longest prefix first.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Returns every route's prefix.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|route| route.prefix.as_str())
    }

    /// Checks and indexes the routes of a file.
    pub fn new(specs: &[RouteSpec]) -> Result<Self, RoutesError> {
        if specs.is_empty() {
            return Err(RoutesError::Empty);
        }
        let mut routes = Vec::with_capacity(specs.len());
        let mut clients = crate::tls::UpstreamClients::default();
        for spec in specs {
            let route = check_route(spec, &mut clients).map_err(|problem| RoutesError::Route {
                prefix: spec.prefix.clone(),
                problem,
            })?;
            if routes
                .iter()
                .any(|other: &Route| other.prefix == route.prefix)
            {
                return Err(RoutesError::Route {
                    prefix: spec.prefix.clone(),
                    problem: "appears twice".to_owned(),
                });
            }
            routes.push(route);
        }
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        Ok(Self { routes })
    }

    /// Returns the route with the longest prefix matching `path` on whole segments, if any.
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| prefix_matches(&route.prefix, path))
    }

    /// Returns every route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn check_route(
    spec: &RouteSpec,
    clients: &mut crate::tls::UpstreamClients,
) -> Result<Route, String> {
    let prefix = spec.prefix.trim_end_matches('/');
    let prefix = if prefix.is_empty() { "/" } else { prefix };
    if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
        return Err("`prefix` must be a path starting with `/`".to_owned());
    }
    let uri: http::Uri = spec
        .upstream
        .parse()
        .map_err(|_| format!("`upstream` `{}` is not a URL", spec.upstream))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        _ => return Err("`upstream` must be an http:// or https:// URL".to_owned()),
    };
    if scheme == "http" && spec.ca_file.is_some() {
        return Err("`ca_file` applies only to an https:// `upstream`".to_owned());
    }
    let authority = uri
        .authority()
        .ok_or_else(|| "`upstream` needs a host".to_owned())?;
    if uri.query().is_some() {
        return Err("`upstream` must not have a query".to_owned());
    }
    if spec.price < 1 {
        return Err(format!("`price` must be at least 1, got {}", spec.price));
    }
    if spec.failure_mode == FailureMode::Open && spec.open_budget == 0 {
        return Err("`failure_mode = \"open\"` needs `open_budget` of at least 1".to_owned());
    }
    if spec.timeout_ms == 0 {
        return Err("`timeout_ms` must be positive".to_owned());
    }
    let client = clients.client(scheme == "https", spec.ca_file.as_deref())?;
    Ok(Route {
        prefix: prefix.to_owned(),
        label: prefix.into(),
        upstream_origin: format!("{scheme}://{authority}"),
        upstream_tls: scheme == "https",
        client,
        upstream_base_path: uri.path().trim_end_matches('/').to_owned(),
        price: spec.price,
        feature: spec.feature.clone(),
        failure_mode: spec.failure_mode,
        open_budget: spec.open_budget,
        timeout: Duration::from_millis(spec.timeout_ms),
    })
}

/// Parses a routes file.
pub fn parse_routes_file(text: &str) -> Result<(RoutesFile, RouteTable), RoutesError> {
    let file: RoutesFile = toml::from_str(text)?;
    let table = RouteTable::new(&file.routes)?;
    Ok((file, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        problem_base_url = "https://docs.example.com/problems"

        [[routes]]
        prefix = "/v1"
        upstream = "http://127.0.0.1:9000"

        [[routes]]
        prefix = "/v1/chat/"
        upstream = "http://127.0.0.1:9001/api"
        price = 5
        feature = "chat"
        failure_mode = "open"
        open_budget = 100
    "#;

    #[test]
    fn the_longest_whole_segment_prefix_wins() {
        let (_, table) = parse_routes_file(FILE).expect("valid file");

        assert_eq!(table.find("/v1/chat/completions").map(|r| r.price), Some(5));
        assert_eq!(table.find("/v1/chat").map(|r| r.price), Some(5));
        assert_eq!(table.find("/v1/chatter").map(|r| r.price), Some(1));
        assert_eq!(table.find("/v1").map(|r| r.price), Some(1));
        assert!(table.find("/v10").is_none());
        assert!(table.find("/").is_none());
    }

    #[test]
    fn an_upstream_base_path_is_kept_without_its_trailing_slash() {
        let (_, table) = parse_routes_file(FILE).expect("valid file");

        let chat = table.find("/v1/chat").expect("route");

        assert_eq!(chat.upstream_origin, "http://127.0.0.1:9001");
        assert_eq!(chat.upstream_base_path, "/api");
        assert_eq!(chat.failure_mode, FailureMode::Open);
    }

    #[test]
    fn bad_routes_are_refused_with_the_route_named() {
        let refuse = |route: &str| {
            parse_routes_file(&format!("[[routes]]\n{route}"))
                .expect_err("must be refused")
                .to_string()
        };

        assert!(refuse("prefix = \"v1\"\nupstream = \"http://a:1\"").contains("starting with `/`"));
        assert!(refuse("prefix = \"/a\"\nupstream = \"ftp://a:1\"").contains("https://"));
        assert!(
            refuse("prefix = \"/a\"\nupstream = \"http://a:1\"\nca_file = \"ca.pem\"")
                .contains("only to an https://")
        );
        assert!(refuse("prefix = \"/a\"\nupstream = \"http://a:1\"\nprice = 0").contains("price"));
        assert!(
            refuse("prefix = \"/a\"\nupstream = \"http://a:1\"\nfailure_mode = \"open\"")
                .contains("open_budget")
        );
        assert!(
            refuse("prefix = \"/a\"\nupstream = \"http://a:1\"\ncolour = \"red\"")
                .contains("colour")
        );
        assert!(parse_routes_file("routes = []").is_err());
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused_naming_route_and_file() {
        let empty =
            std::env::temp_dir().join(format!("paygate-no-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&empty, "not a certificate\n").expect("write the file");
        let missing = empty.with_extension("missing");
        let refuse = |file: &std::path::Path| {
            parse_routes_file(&format!(
                "[[routes]]\nprefix = \"/llm\"\nupstream = \"https://a:1\"\nca_file = \"{}\"",
                file.display()
            ))
            .expect_err("must be refused")
            .to_string()
        };

        let (for_missing, for_empty) = (refuse(&missing), refuse(&empty));
        let _ = std::fs::remove_file(&empty);

        for (refusal, file) in [(&for_missing, &missing), (&for_empty, &empty)] {
            assert!(refusal.contains("route `/llm`"), "{refusal}");
            assert!(refusal.contains(&file.display().to_string()), "{refusal}");
        }
        assert!(for_empty.contains("no PEM certificate"), "{for_empty}");
    }

    #[test]
    fn connection_limits_default_when_unset_and_refuse_zero() {
        let with_limits = |limits: &str| {
            parse_routes_file(&format!("{FILE}\n[limits]\n{limits}\n")).map(|(file, _)| file.limits)
        };

        let defaults = with_limits("").expect("no limits");
        let set = with_limits("max_connections = 3\nidle_timeout_ms = 1500").expect("limits");

        assert_eq!(defaults.idle_timeout_ms.get(), 60_000);
        assert_eq!(defaults.max_connections, None);
        assert_eq!(defaults.max_concurrent_streams.get(), 100);
        assert_eq!(set.max_connections.map(NonZeroUsize::get), Some(3));
        assert_eq!(set.idle_timeout_ms.get(), 1500);
        for zero in [
            "max_connections = 0",
            "idle_timeout_ms = 0",
            "header_read_timeout_ms = 0",
            "max_concurrent_streams = 0",
        ] {
            assert!(with_limits(zero).is_err(), "{zero} was accepted");
        }
    }
}
