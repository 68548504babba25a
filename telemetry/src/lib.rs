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
pub mod metric_help;
pub mod traces;

pub use log_limit::{LogLimit, REPEAT_INTERVAL};

/// Installs the subscriber of a service binary: logs filtered by `RUST_LOG` (default `info`) as lines on
/// stdout, in the format `LOG_FORMAT` names (`text`, the default, or `json`: one object per line), with ANSI
/// colour only when stdout is a terminal; and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span at
/// `info` or above exported over OTLP as `service` (whatever `RUST_LOG` says, so quiet logs keep full
/// traces). Fails on an unknown `LOG_FORMAT`. Keep the guard and call `shutdown` last, so the spans still
/// buffered are sent.
pub fn init(service: &'static str) -> anyhow::Result<TelemetryGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};

    let format = LogFormat::from_env()?;
    let provider = traces::otlp_provider(service)?;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_filter(filter)
            .boxed(),
    };
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

/// How log lines are written, from `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// Reads `LOG_FORMAT`: unset or empty means `text`; anything but `text` or `json` is an error that names
    /// the variable.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("LOG_FORMAT") {
            Err(std::env::VarError::NotPresent) => Ok(Self::Text),
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("LOG_FORMAT must be `text` or `json`")
            }
            Ok(value) => Self::parse(&value),
        }
    }

    fn parse(value: &str) -> anyhow::Result<Self> {
        match value.trim() {
            "" | "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => anyhow::bail!("LOG_FORMAT must be `text` or `json`, got `{other}`"),
        }
    }
}

/// Returns `error` as one line for a start-up failure: each cause once (a cause whose text the message
/// already holds, as when an error's `Display` includes its source, is left out), joined by `: `, with
/// line breaks inside a cause folded into spaces.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = fold_lines(&cause.to_string());
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Returns a clap error's rendered text as one line: its message without the `error: ` tag, the usage
/// and the `--help` hint, which repeat what `--help` says.
pub fn one_line_usage_error(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect();
    let line = message.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

fn fold_lines(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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
            metric_help::describe_all();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connect failed: {0}")]
    struct Repeating(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = anyhow::Error::new(Repeating(refused)).context("REDIS_URL");

        let line = one_line(&error);

        assert_eq!(line, "REDIS_URL: connect failed: connection refused");
    }

    #[test]
    fn line_breaks_inside_a_cause_are_folded() {
        let error =
            anyhow::anyhow!("TOML parse error at line 2\n  |\n2 | [[x\n").context("GATEWAY_CONFIG");

        assert_eq!(
            one_line(&error),
            "GATEWAY_CONFIG: TOML parse error at line 2 | 2 | [[x"
        );
    }

    #[test]
    fn a_usage_error_keeps_its_message_and_drops_usage_and_hint() {
        let rendered = "error: the following required arguments were not provided:\n  --routes-file <GATEWAY_CONFIG>\n\nUsage: gateway --routes-file <GATEWAY_CONFIG>\n\nFor more information, try '--help'.\n";

        assert_eq!(
            one_line_usage_error(rendered),
            "the following required arguments were not provided: --routes-file <GATEWAY_CONFIG>"
        );
    }

    #[test]
    fn log_format_accepts_text_and_json_only() {
        assert_eq!(LogFormat::parse("").ok(), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("json").ok(), Some(LogFormat::Json));
        let refused = LogFormat::parse("xml").expect_err("xml is refused");
        assert_eq!(
            refused.to_string(),
            "LOG_FORMAT must be `text` or `json`, got `xml`"
        );
    }
}
