//! The gateway: paygate's HTTP front door, which decides per request whether to forward or answer 402
//! (DESIGN §2). It asks billing (`Entitlements`, cached) who the key belongs to and usage (`Usage`) whether
//! the request is paid for, then streams the request to the upstream and the answer back.
//!
//! Layout:
//! - `config`: settings from flags and the environment
//! - `routes`: the routes file and longest-prefix lookup
//! - `headers`: API-key extraction and header hygiene toward upstreams and clients
//! - `client_ip`: the client's address, behind trusted proxies or not
//! - `problem`: problem+json bodies and the human pages per code
//! - `backends`: billing and usage calls with deadlines and circuit breakers
//! - `entitlements`: the entitlement cache and billing's change stream
//! - `connections`: head and idle deadlines per connection, the connection limit, accept back-off
//! - `framing`: the connection guard that finds requests framed two ways, and the framing check per request
//! - `decision`: framing → key → entitlement → standing → admission, ending in a verdict or a refusal
//! - `leases`: leases held in memory and spent without a network call (the arithmetic)
//! - `lessor`: asking usage for leases, returning them, following recalls
//! - `upstream`: forwarding a decided request and streaming the answer back
//! - `error`: `Refusal`, the one place a request the gateway does not forward becomes its answer
//! - `proxy`: `handle`, the path of one request: decide → forward → settle
//! - `readiness`: the background check behind `/_paygate/ready`
//! - `tls`: the upstream clients (https, ALPN) and the optional HTTPS listener with certificate reload
//! - `stats`: runtime statistics per customer and hour, reported to billing

pub mod backends;
pub mod client_ip;
pub mod config;
pub mod connections;
pub mod decision;
pub mod entitlements;
pub mod error;
pub mod framing;
pub mod headers;
pub mod leases;
pub mod lessor;
pub mod problem;
pub mod proxy;
pub mod readiness;
pub mod routes;
pub mod stats;
pub mod tls;
pub mod upstream;

use std::{
    convert::Infallible,
    future::Future,
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use proxy::Gateway;

/// How long in-flight requests may take to finish once shutdown starts.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long the accept loop pauses after an accept error that is not the client's (out of files).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per this interval for each kind of repeated connection failure.
const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// HTTP/2 PING every this long; a peer that does not answer within `H2_PING_TIMEOUT` is disconnected.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// `reason` label of connections closed because `max_connections` were open.
const OVER_LIMIT: &str = "over_limit";

/// Builds the gateway from a parsed routes file and the backends it calls; customer statistics go to
/// billing every `stats_interval`.
pub fn gateway(
    file: routes::RoutesFile,
    table: routes::RouteTable,
    backends: backends::Backends,
    stats_interval: Duration,
    leases: config::Leases,
) -> Arc<Gateway> {
    // Every series exists from the start, so Prometheus' rate() sees the first event as an increase.
    register_route_series(&table);
    for result in ["applied", "refused"] {
        metrics::counter!("paygate_gateway_route_reloads_total", "result" => result).increment(0);
    }
    for backend in ["billing", "usage"] {
        for kind in ["circuit_open", "deadline", "failed"] {
            metrics::counter!("paygate_gateway_backend_errors_total", "backend" => backend, "kind" => kind)
                .increment(0);
        }
        metrics::gauge!("paygate_gateway_breaker_open", "backend" => backend).set(0.0);
    }
    for result in ["hit", "miss"] {
        metrics::counter!("paygate_gateway_entitlement_cache_total", "result" => result)
            .increment(0);
    }
    let stale_for = file.entitlements_stale_for();
    let backends_for_leases = backends.clone();
    Arc::new(Gateway {
        routes: RwLock::new(Arc::new(table)),
        file,
        readiness: Arc::new(readiness::Readiness::new()),
        cache: entitlements::EntitlementCache::new(backends.clone(), stale_for),
        backends,
        degraded_passes: std::sync::Mutex::new(std::collections::HashMap::new()),
        stats: stats::CustomerStats::default(),
        stats_interval,
        lessor: (leases == config::Leases::On).then(|| {
            Arc::new(lessor::Lessor::new(
                backends_for_leases,
                leases::Sizing::default(),
            ))
        }),
    })
}

fn register_route_series(table: &routes::RouteTable) {
    for route in table.prefixes() {
        metrics::counter!("paygate_gateway_degraded_passes_total", "route" => route.to_owned())
            .increment(0);
    }
}

/// Reads and checks the routes file at `path`; the error is one line that names `GATEWAY_CONFIG`, the
/// path and what is wrong (for TOML, the line and column).
pub fn load_routes_file(path: &Path) -> anyhow::Result<(routes::RoutesFile, routes::RouteTable)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read GATEWAY_CONFIG `{}`", path.display()))?;
    routes::parse_routes_file(&text).map_err(|error| {
        let why = match &error {
            routes::RoutesError::Toml(toml) => toml_error_line(&text, toml),
            other => other.to_string(),
        };
        anyhow::anyhow!("GATEWAY_CONFIG `{}`: {why}", path.display())
    })
}

/// Returns a TOML error as one line: `not valid TOML at line L, column C: <message>`.
fn toml_error_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return format!("not valid TOML: {message}");
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
    format!("not valid TOML at line {line}, column {column}: {message}")
}

/// Reads the routes file at `path` again and, when it is valid, puts its routes in force: requests that
/// start from then on use them, requests in flight finish on the old ones. Returns the number of routes
/// now in force. When the file cannot be read or is not valid, the routes in force stay and the error
/// (one line, also logged) says why. Settings of the file other than its routes (`[limits]`, problem
/// URLs, trusted proxies, `entitlements_stale_for_ms`) apply at restart; a reload that changes them says so.
pub fn reload_routes(gateway: &Gateway, path: &Path) -> anyhow::Result<usize> {
    let (file, table) = match load_routes_file(path) {
        Ok(loaded) => loaded,
        Err(error) => {
            metrics::counter!("paygate_gateway_route_reloads_total", "result" => "refused")
                .increment(1);
            tracing::warn!(
                error = %telemetry::one_line(&error),
                "routes file not reloaded; the routes in force stay"
            );
            return Err(error);
        }
    };
    if settings_besides_routes(&file) != settings_besides_routes(&gateway.file) {
        tracing::warn!(
            "the routes file's settings other than its routes changed; they apply at restart"
        );
    }
    register_route_series(&table);
    let count = table.routes().len();
    gateway.replace_routes(table);
    metrics::counter!("paygate_gateway_route_reloads_total", "result" => "applied").increment(1);
    tracing::info!(routes = count, "routes file reloaded");
    Ok(count)
}

/// Returns a routes file's settings other than its routes, comparable with another file's.
fn settings_besides_routes(file: &routes::RoutesFile) -> String {
    let mut settings = file.clone();
    settings.routes.clear();
    format!("{settings:?}")
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `shutdown` completes, then stops accepting and lets
/// in-flight requests finish (for at most 30 s). Billing's change stream is followed meanwhile.
/// Connections are bounded by the routes file's `[limits]` (see `connections`).
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with_tls(listener, gateway, None, shutdown).await
}

/// Serves like [`serve`], over TLS when `tls` is given: HTTPS with ALPN `h2` and `http/1.1`, the
/// handshake counted in the head deadline (`header_read_timeout_ms`), and the certificate files checked
/// every few seconds for a new pair (see [`tls::ServerTls::reload`]).
pub async fn serve_with_tls(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let follower = {
        let lessor = gateway.lessor.clone();
        tokio::spawn(
            gateway
                .cache
                .clone()
                .follow_changes(stop.clone(), move |changed| {
                    if let Some(lessor) = &lessor {
                        match changed {
                            entitlements::Changed::Customer(customer_id) => {
                                lessor.customer_changed(customer_id)
                            }
                            entitlements::Changed::Everyone => lessor.everyone_changed(),
                        }
                    }
                }),
        )
    };
    // Stopped after the drain, like the follower: requests finishing during it still spend and refund
    // from leases; then every lease still held is returned.
    let lessor = gateway
        .lessor
        .clone()
        .map(|lessor| tokio::spawn(lessor.run(stop.clone())));
    let certificate_watch = tls
        .clone()
        .map(|tls| tokio::spawn(tls.watch(tls::CERTIFICATE_CHECK_INTERVAL, stop.clone())));
    let checker = tokio::spawn(readiness::check_continuously(
        gateway.readiness.clone(),
        gateway.backends.clone(),
        stop.clone(),
    ));
    let reporting = {
        let gateway = gateway.clone();
        let stop_reporting = CancellationToken::new();
        let stopper = stop_reporting.clone();
        let task = tokio::spawn(async move {
            gateway
                .stats
                .report(
                    gateway.backends.billing(),
                    gateway.stats_interval,
                    stop_reporting,
                )
                .await;
        });
        (task, stopper)
    };
    let limits = gateway.file.limits;
    let builder = Arc::new(http_builder(&limits));
    let head_timeout = Duration::from_millis(limits.header_read_timeout_ms.get());
    let idle_timeout = Duration::from_millis(limits.idle_timeout_ms.get());
    let open = Arc::new(Semaphore::new(connection_limit(&limits).get()));
    for reason in [
        connections::Expiry::Head.label(),
        connections::Expiry::Idle.label(),
        OVER_LIMIT,
    ] {
        metrics::counter!("paygate_gateway_connections_closed_total", "reason" => reason)
            .increment(0);
    }
    metrics::gauge!("paygate_gateway_connections_open").set(0.0);
    let mut accept_failures = connections::RepeatedWarning::new("accept failed", LOG_INTERVAL);
    let mut refusals = connections::RepeatedWarning::new(
        "connection closed at once: `max_connections` are open",
        LOG_INTERVAL,
    );
    let mut report_warnings = tokio::time::interval(LOG_INTERVAL);
    report_warnings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            _ = report_warnings.tick() => {
                accept_failures.flush();
                refusals.flush();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failures.record(&error);
                    if !connections::is_per_connection_error(&error) {
                        // Out of files or memory: the pending connection stays queued and accept fails
                        // again at once, so wait for connections to close instead of spinning.
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refusals.record(peer);
            metrics::counter!("paygate_gateway_connections_closed_total", "reason" => OVER_LIMIT)
                .increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            gateway: gateway.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            activity: Arc::new(connections::Activity::new(head_timeout, idle_timeout)),
            max_head: limits.max_header_bytes.max(8192) + 1024,
            peer,
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::new(permit);
            match tls {
                None => connection.serve(stream, headers::Scheme::Http).await,
                Some(tls) => connection.serve_tls(stream, &tls).await,
            }
        });
    }
    drop(listener);
    gateway.readiness.shutting_down();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_LIMIT) => tracing::warn!("in-flight requests did not finish in time"),
    }
    stop.cancel();
    let _ = follower.await;
    if let Some(lessor) = lessor {
        let _ = lessor.await;
    }
    if let Some(watch) = certificate_watch {
        let _ = watch.await;
    }
    let _ = checker.await;
    // After the drain, so the requests that finished during it are in the last report.
    reporting.1.cancel();
    let _ = reporting.0.await;
    Ok(())
}

/// One accepted client connection and what serving it needs.
struct Connection {
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    activity: Arc<connections::Activity>,
    /// Longest head the framing guard follows (see `framing`).
    max_head: usize,
    peer: std::net::SocketAddr,
}

impl Connection {
    /// Runs the TLS handshake within the connection's head deadline, then serves it; a client that does
    /// not finish the handshake in time is dropped like one that does not finish its head.
    async fn serve_tls(self, stream: TcpStream, tls: &tls::ServerTls) {
        let peer = self.peer;
        let handshake = tls.acceptor().accept(stream);
        let deadline = self.activity.deadline().map(|(at, _)| at);
        let finished = match deadline {
            Some(at) => tokio::time::timeout_at(at, handshake).await,
            None => Ok(handshake.await),
        };
        match finished {
            Ok(Ok(stream)) => self.serve(stream, headers::Scheme::Https).await,
            Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
            Err(_) => {
                let expiry = connections::Expiry::Head;
                tracing::debug!(reason = expiry.label(), %peer, "connection closed during the TLS handshake");
                metrics::counter!("paygate_gateway_connections_closed_total", "reason" => expiry.label())
                    .increment(1);
            }
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 on `stream` under the connection's deadlines; requests are marked with
    /// the `scheme` the client used, which the upstream is told.
    async fn serve<IO>(self, stream: IO, scheme: headers::Scheme)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            gateway,
            builder,
            watcher,
            activity,
            max_head,
            peer,
        } = self;
        let service = {
            let activity = activity.clone();
            service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(scheme);
                let in_progress = activity.request_started();
                let answer = gateway.clone().handle(request, peer);
                async move {
                    let response = answer.await?;
                    Ok::<_, Infallible>(
                        response.map(|body| connections::TrackedBody::new(body, in_progress)),
                    )
                }
            })
        };
        let guarded = framing::Guarded::new(stream, max_head).reporting_to(activity.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(guarded), service);
        match connections::enforce_deadlines(watcher.watch(connection), &activity).await {
            connections::Ending::Finished(Ok(())) => {}
            connections::Ending::Finished(Err(error)) => {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            connections::Ending::Expired(expiry) => {
                tracing::debug!(reason = expiry.label(), %peer, "connection closed");
                metrics::counter!(
                    "paygate_gateway_connections_closed_total",
                    "reason" => expiry.label()
                )
                .increment(1);
            }
        }
    }
}

/// Returns the HTTP/1.1 and HTTP/2 server settings for `limits`.
fn http_builder(limits: &routes::RequestLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The head deadline is ours (`connections`): hyper's timer would also cut idle keep-alive
        // connections, and it cannot see a head the framing guard holds back.
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams.get())
        // Finds peers that vanished while their streams wait for an upstream.
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// Returns the most client connections open at once, logging where the figure comes from.
fn connection_limit(limits: &routes::RequestLimits) -> std::num::NonZeroUsize {
    match limits.max_connections {
        Some(max) => {
            tracing::info!(
                max_connections = max,
                "connection limit from the routes file"
            );
            max
        }
        None => {
            let open_files = connections::open_files_soft_limit();
            let max = connections::default_max_connections(open_files);
            tracing::info!(
                max_connections = max,
                open_files_limit = open_files,
                "connection limit derived from the open-files limit"
            );
            max
        }
    }
}

/// A client connection counted against `max_connections` and in `paygate_gateway_connections_open`.
struct OpenConnection {
    _permit: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!("paygate_gateway_connections_open").increment(1.0);
        Self { _permit: permit }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("paygate_gateway_connections_open").decrement(1.0);
    }
}
