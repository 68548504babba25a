//! Starts billing: settings, logging, PostgreSQL, migrations, then the gRPC server until SIGINT/SIGTERM.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;

// glibc's allocator showed up as a fifth of the request path's CPU in profiles; mimalloc's thread-local
// free lists suit many short-lived allocations per request (bench/README.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match billing::Config::try_parse() {
        Ok(config) => config,
        Err(error) if !error.use_stderr() => {
            let _ = error.print(); // --help and --version
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!(
                "billing: {}",
                telemetry::one_line_usage_error(&error.to_string())
            );
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match telemetry::init("billing") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("billing: {}", telemetry::one_line(&error));
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(config).await;
    telemetry.shutdown().await; // flush spans last
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, so the cause is readable in any log collector.
            eprintln!("billing: {}", telemetry::one_line(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: billing::Config) -> anyhow::Result<()> {
    let secrets = config.secrets()?;
    let grpc_tls = config.grpc_tls()?;
    let options = connect_options(&secrets)?;
    tracing::info!(
        host = options.get_host(),
        port = options.get_port(),
        "connecting to PostgreSQL (DATABASE_URL)"
    );
    let db = billing::connect_database(options, config.db_max_connections)
        .await
        .context("DATABASE_URL")?;
    billing::MIGRATOR
        .run(&db)
        .await
        .context("failed to run migrations")?;
    let metrics = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "failed to listen on BILLING_METRICS_ADDR {}",
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
                "failed to listen on BILLING_LISTEN_ADDR {}",
                config.listen_addr
            )
        })?;
    let listener = proto::tls::GrpcListener::new(listener, grpc_tls);
    tracing::info!(addr = %config.listen_addr, "billing listening");
    billing::serve(
        listener,
        db,
        secrets.tokens,
        Arc::new(billing::SystemClock),
        shutdown_signal(),
    )
    .await
}

/// Returns the connection options of DATABASE_URL, with DATABASE_PASSWORD in place of its password when
/// set (so the password needs no URL escaping).
fn connect_options(secrets: &billing::config::Secrets) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = secrets
        .database_url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?;
    Ok(match &secrets.database_password {
        Some(password) => options.password(password),
        None => options,
    })
}

/// Completes on SIGINT or SIGTERM, logging which arrived.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops billing");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received, shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
