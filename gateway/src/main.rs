//! Starts the gateway: settings, logging, routes, backends, then HTTP until SIGINT/SIGTERM; SIGHUP reloads
//! the routes file. Every start-up failure is one line on stderr and a non-zero exit.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

// glibc's allocator showed up as a fifth of the request path's CPU in profiles; mimalloc's thread-local
// free lists suit many short-lived allocations per request (bench/README.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match gateway::Config::try_parse() {
        Ok(config) => config,
        Err(error) if !error.use_stderr() => {
            let _ = error.print(); // --help and --version
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!(
                "gateway: {}",
                telemetry::one_line_usage_error(&error.to_string())
            );
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match telemetry::init("gateway") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("gateway: {}", telemetry::one_line(&error));
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(config).await;
    telemetry.shutdown().await; // flush spans last
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, so the cause is readable in any log collector.
            eprintln!("gateway: {}", telemetry::one_line(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: gateway::Config) -> anyhow::Result<()> {
    let token = config.service_token()?;
    let tls = config.server_tls()?;
    let routes_path = config.routes_path()?.to_owned();
    let (file, table) = gateway::load_routes_file(&routes_path)?;
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
        .with_context(|| {
            format!(
                "failed to listen on GATEWAY_METRICS_ADDR {}",
                config.metrics_addr
            )
        })?;
    tokio::spawn(telemetry::serve_metrics(
        metrics,
        telemetry::metrics(),
        std::future::pending(),
    ));
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| {
            format!(
                "failed to listen on GATEWAY_LISTEN_ADDR {}",
                config.listen_addr
            )
        })?;
    tracing::info!(addr = %config.listen_addr, routes = table.routes().len(), https = tls.is_some(), leases = ?config.leases, "gateway listening");
    let gateway = gateway::gateway(
        file,
        table,
        backends,
        config.stats_interval(),
        config.leases,
    );
    reload_on_hangup(gateway.clone(), routes_path, tls.clone())?;
    gateway::serve_with_tls(listener, gateway, tls, shutdown_signal()).await
}

/// On every SIGHUP, reloads the routes file at `path` (`gateway::reload_routes` logs the outcome) and the
/// listener's certificate, when HTTPS is on (it is also re-read when its files change).
fn reload_on_hangup(
    gateway: Arc<gateway::Gateway>,
    path: PathBuf,
    tls: Option<gateway::tls::ServerTls>,
) -> anyhow::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("failed to listen for SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(path = %path.display(), "SIGHUP received, reloading the routes file");
            let _ = gateway::reload_routes(&gateway, &path);
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(gateway::tls::Reload::Replaced) => {
                        tracing::info!("TLS certificate reloaded")
                    }
                    Ok(gateway::tls::Reload::Unchanged) => {}
                    Err(error) => tracing::warn!(
                        %error,
                        "new TLS certificate refused; still serving the previous one"
                    ),
                }
            }
        }
    });
    Ok(())
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
