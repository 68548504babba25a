//! Starts the gateway: settings, logging, routes, backends, then HTTP until SIGINT/SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

// glibc's allocator showed up as a fifth of the request path's CPU in profiles; mimalloc's thread-local
// free lists suit many short-lived allocations per request (bench/README.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = gateway::Config::parse();
    let telemetry = match telemetry::init("gateway") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("gateway: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(config).await;
    telemetry.shutdown().await; // flush spans last
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, so the cause is readable in any log collector.
            eprintln!("gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: gateway::Config) -> anyhow::Result<()> {
    let token = config.service_token()?;
    let tls = config.server_tls()?;
    let text = std::fs::read_to_string(&config.routes_file).with_context(|| {
        format!(
            "failed to read GATEWAY_CONFIG `{}`",
            config.routes_file.display()
        )
    })?;
    let (file, table) = gateway::routes::parse_routes_file(&text)
        .with_context(|| format!("GATEWAY_CONFIG `{}`", config.routes_file.display()))?;
    let token = proto::auth::BearerToken::new(&token)
        .context("PAYGATE_SERVICE_TOKEN is not valid in a header")?;
    let grpc_ca = config.grpc_ca()?;
    let backends = gateway::backends::Backends::new(
        gateway::backends::channel_trusting(&config.billing_url, grpc_ca.as_ref())
            .context("BILLING_URL")?,
        gateway::backends::channel_trusting(&config.usage_url, grpc_ca.as_ref())
            .context("USAGE_URL")?,
        token,
        config.backend_deadline(),
    );
    let metrics = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("failed to listen on {} for metrics", config.metrics_addr))?;
    tokio::spawn(telemetry::serve_metrics(
        metrics,
        telemetry::metrics(),
        std::future::pending(),
    ));
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, routes = table.routes().len(), https = tls.is_some(), "gateway listening");
    gateway::serve_with_tls(
        listener,
        gateway::gateway(file, table, backends, config.stats_interval()),
        tls,
        shutdown_signal(),
    )
    .await
}

/// Completes on SIGINT or SIGTERM, logging which arrived.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the gateway");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received, shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
