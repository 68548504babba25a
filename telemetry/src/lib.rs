//! What every paygate service reports the same way: logs (the `tracing` subscriber), traces (OTLP export
//! and W3C trace context, in `traces`) and Prometheus metrics (the process-wide `metrics` recorder and its
//! `/metrics` endpoint). It is the one crate besides `proto` that the services share, so that their log
//! format, trace propagation and metric conventions cannot drift apart.
//!
//! Metric names are `paygate_<service>_<what>`; histograms are in seconds with the buckets below. No metric
//! has a per-customer label: per-customer figures come from billing's admin API.

use std::{convert::Infallible, future::Future, sync::OnceLock, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Histogram buckets in seconds: fine below a millisecond, where the decision path lives, and up to the
/// upstream timeouts.
const BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// How often histogram samples are folded in when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub mod log_limit;
pub mod traces;

pub use log_limit::{LogLimit, REPEAT_INTERVAL};

/// Installs the subscriber of a service binary: logs filtered by `RUST_LOG` (default `info`) as lines on
/// stdout, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span at `info` or above exported over OTLP
/// as `service` (whatever `RUST_LOG` says, so quiet logs keep full traces). Keep the guard and call
/// `shutdown` last, so the spans still buffered are sent.
pub fn init(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};

    let provider = traces::otlp_provider(service)?;
    let logs = tracing_subscriber::fmt::layer().with_filter(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
    );
    let spans = provider.as_ref().map(|provider| {
        traces::layer(provider, service).with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|error| anyhow::anyhow!("failed to install the log subscriber: {error}"))?;
    Ok(TelemetryGuard { provider })
}

/// Keeps the trace exporter of `init`; `shutdown` flushes it.
#[must_use = "call `shutdown` before exiting, or buffered spans are lost"]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Sends the spans still buffered and stops the exporter (on the blocking pool: the SDK's shutdown
    /// blocks).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "trace export did not shut down cleanly");
            }
        }
    }
}

/// Returns the process-wide Prometheus recorder's handle, installing the recorder on first use. The
/// `metrics` facade has one recorder per process; services in one test process share it, which is why
/// every metric name carries its service.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test's); ours then simply records nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves the Prometheus text format on `GET /metrics` (anything else is 404) until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) {
    let upkeep = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                ticks.tick().await;
                handle.run_upkeep();
            }
        })
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics: accept failed");
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(answer(&handle, &request)) }
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "metrics: connection ended with an error");
            }
        });
    }
    upkeep.abort();
}

fn answer(handle: &PrometheusHandle, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut response = if request.uri().path() == "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from(handle.render())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
    };
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}
