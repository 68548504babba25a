//! Starts billing: settings, logging, PostgreSQL, migrations, then the gRPC server until SIGINT/SIGTERM.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::net::TcpListener;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// glibc's allocator showed up as a fifth of the request path's CPU in profiles; mimalloc's thread-local
// free lists suit many short-lived allocations per request (bench/README.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = billing::Config::parse();
    let telemetry = match telemetry::init("billing") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("billing: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(config).await;
    telemetry.shutdown().await; // flush spans last
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, so the cause is readable in any log collector.
            eprintln!("billing: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: billing::Config) -> anyhow::Result<()> {
    let secrets = config.secrets()?;
    let options: PgConnectOptions = secrets
        .database_url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?;
    // One direct attempt first: a pool reports only "timed out", this reports why (refused, bad password).
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .context("failed to connect to postgres: timed out")?
        .context("failed to connect to postgres")?;
    probe.close().await.ok();
    let db = PgPoolOptions::new()
        .max_connections(config.db_max_connections)
        .acquire_timeout(billing::DB_ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .context("failed to connect to postgres")?;
    billing::MIGRATOR
        .run(&db)
        .await
        .context("failed to run migrations")?;
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
