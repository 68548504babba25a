//! The gateway: paygate's HTTP front door, which decides per request whether to forward or answer 402
//! (DESIGN §2). It asks billing (`Entitlements`, cached) who the key belongs to and usage (`Usage`) whether
//! the request is paid for, then streams the request to the upstream and the answer back.
//!
//! Layout:
//! - `config`: settings from flags and the environment
//! - `routes`: the routes file and longest-prefix lookup
//! - `headers`: API-key extraction and header hygiene toward upstreams and clients
//! - `client_ip`: the client's address, behind trusted proxies or not
//! - `log_limit`: one log line per interval for failures that repeat
//! - `problem`: problem+json bodies and the human pages per code
//! - `backends`: billing and usage calls with deadlines and circuit breakers
//! - `entitlements`: the entitlement cache and billing's change stream
//! - `framing`: the connection guard that finds requests framed two ways
//! - `proxy`: the decision per request and the forwarding
//! - `stats`: runtime statistics per customer and hour, reported to billing

pub mod backends;
pub mod client_ip;
pub mod config;
pub mod entitlements;
pub mod framing;
pub mod headers;
pub mod log_limit;
pub mod problem;
pub mod proxy;
pub mod routes;
pub mod stats;

use std::{future::Future, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use proxy::Gateway;

/// How long in-flight requests may take to finish once shutdown starts.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Builds the gateway from a parsed routes file and the backends it calls; customer statistics go to
/// billing every `stats_interval`.
pub fn gateway(
    file: routes::RoutesFile,
    table: routes::RouteTable,
    backends: backends::Backends,
    stats_interval: Duration,
) -> Arc<Gateway> {
    // Every series exists from the start, so Prometheus' rate() sees the first event as an increase.
    for route in table.prefixes() {
        metrics::counter!("paygate_gateway_degraded_passes_total", "route" => route.to_owned())
            .increment(0);
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
    Arc::new(Gateway {
        routes: table,
        file,
        cache: entitlements::EntitlementCache::new(backends.clone(), stale_for),
        backends,
        upstream: proxy::upstream_client(),
        degraded_passes: std::sync::Mutex::new(std::collections::HashMap::new()),
        stats: stats::CustomerStats::default(),
        stats_interval,
    })
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `shutdown` completes, then stops accepting and lets
/// in-flight requests finish (for at most 30 s). Billing's change stream is followed meanwhile.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let follower = tokio::spawn(gateway.cache.clone().follow_changes(stop.clone()));
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer hyper silently ignores the header read timeout.
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = service_fn(move |request| gateway.clone().handle(request, peer));
            let guarded = framing::Guarded::new(stream, limits.max_header_bytes.max(8192) + 1024);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(guarded), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_LIMIT) => tracing::warn!("in-flight requests did not finish in time"),
    }
    stop.cancel();
    let _ = follower.await;
    // After the drain, so the requests that finished during it are in the last report.
    reporting.1.cancel();
    let _ = reporting.0.await;
    Ok(())
}
