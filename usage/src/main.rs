//! Starts usage: settings, logging, Redis (checked for durability), then the gRPC server until
//! SIGINT/SIGTERM, and a last usage report before exiting.

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
    let config = match usage::Config::try_parse() {
        Ok(config) => config,
        Err(error) if !error.use_stderr() => {
            let _ = error.print(); // --help and --version
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!(
                "usage: {}",
                telemetry::one_line_usage_error(&error.to_string())
            );
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match telemetry::init("usage") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("usage: {}", telemetry::one_line(&error));
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(config).await;
    telemetry.shutdown().await; // flush spans last
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, so the cause is readable in any log collector.
            eprintln!("usage: {}", telemetry::one_line(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: usage::Config) -> anyhow::Result<()> {
    let secrets = config.secrets()?;
    let grpc_tls = config.grpc_tls()?;
    let grpc_ca = config.grpc_ca()?;
    let redis_client = usage::redis_client(&secrets.redis_url, config.redis_ca_file.as_deref())?;
    // A Redis still loading its data is waited for (up to minutes): say so before any wait.
    tracing::info!("connecting to Redis (REDIS_URL)");
    let redis = usage::connect_redis_with(&redis_client)
        .await
        .context("REDIS_URL")?;
    let probe = usage::RedisProbe::with_client(redis_client, redis.clone());
    let lease_settings = config.lease_settings()?;
    let counters = usage::Counters::new(redis, usage::Keys::new(config.key_prefix.clone()))
        .await
        .context("failed to load the admission script into redis")?
        .with_lease_settings(lease_settings);
    usage::check_durability(&counters, config.allow_volatile_redis).await?;
    let billing = usage::billing_client_trusting(
        &config.billing_url,
        &secrets.service_token,
        grpc_ca.as_ref(),
    )?;
    let metrics = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "failed to listen on USAGE_METRICS_ADDR {}",
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
                "failed to listen on USAGE_LISTEN_ADDR {}",
                config.listen_addr
            )
        })?;
    let listener = proto::tls::GrpcListener::new(listener, grpc_tls);
    tracing::info!(addr = %config.listen_addr, "usage listening");
    let settings = usage::Settings {
        service_token: secrets.service_token,
        report_interval: config.report_interval(),
        reconcile_interval: config.reconcile_interval(),
    };
    usage::serve(
        listener,
        counters,
        probe,
        billing,
        settings,
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
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops usage");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received, shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
