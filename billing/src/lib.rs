//! The billing service: money and identity in PostgreSQL, served over gRPC.
//!
//! Layout:
//! - `config`: settings from flags and the environment
//! - `clock`: the injectable source of "now"
//! - `domain`: newtypes, validation and the pure rules (status over time, periods, key minting)
//! - `store`: every SQL statement
//! - `changes`: the entitlement change feed (LISTEN/NOTIFY fan-out to watchers)
//! - `grpc`: the transport adapter between proto and domain
//! - `error`: the service's error type and its mapping to gRPC status
//! - `health`: the database probe behind gRPC health and the refusal of calls while it is unreachable
//! - `rpc_counter`: the tower layer counting every RPC for Prometheus

pub mod changes;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod health;
pub mod rpc_counter;
pub mod store;

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use proto::tls::GrpcListener;
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    server::NamedService,
    service::Interceptor,
    transport::{Server, server::TcpIncoming},
};

use proto::billing::v1::{
    billing_admin_server::BillingAdminServer, entitlements_server::EntitlementsServer,
};

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;

/// The schema migrations, run at start-up by `main` and by the test harness.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// How long a call waits for a pool connection before it is answered UNAVAILABLE. An unreachable database
/// is caught by the probe (`health`), which refuses calls at once within about 100 ms, so only calls
/// already waiting when it dies wait this long. It is not shorter because a pool that is merely busy (a
/// burst of admin writes serialised on the change feed's lock) is not an outage: at 100 ms, issuing keys in
/// bulk was answered "database unavailable" (bench/faults).
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long billing waits at start for PostgreSQL to accept a connection.
const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to PostgreSQL at start: one direct attempt first, because a pool reports only "timed out"
/// where this reports why (refused, a bad password, a certificate not trusted under `sslmode=verify-ca`
/// or `verify-full`), then a pool of at most `max_connections`.
pub async fn connect_database(
    options: PgConnectOptions,
    max_connections: u32,
) -> anyhow::Result<PgPool> {
    let probe = match tokio::time::timeout(DB_CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
    {
        Err(_) => anyhow::bail!("failed to connect to postgres: timed out"),
        Ok(Err(error)) => match proto::tls::certificate_rejection(&error) {
            Some(reason) => anyhow::bail!(
                "failed to connect to postgres: its TLS certificate was not trusted (check sslrootcert and sslmode in DATABASE_URL): {reason}"
            ),
            None => return Err(error).context("failed to connect to postgres"),
        },
        Ok(Ok(probe)) => probe,
    };
    probe.close().await.ok();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(DB_ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .context("failed to connect to postgres")
}

/// The bearer tokens billing requires: one for `BillingAdmin`, another for `Entitlements`.
#[derive(Clone)]
pub struct Tokens {
    /// Required by every `BillingAdmin` call.
    pub admin: String,
    /// Required by every `Entitlements` call.
    pub service: String,
}

/// Serves billing's gRPC APIs (with health and reflection) on `listener` (TLS when it carries a
/// certificate, else plaintext) until `shutdown` completes, then ends open change streams and drains
/// in-flight calls.
pub async fn serve(
    listener: impl Into<GrpcListener>,
    db: PgPool,
    tokens: Tokens,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Every series exists from the start, so Prometheus' rate() sees the first event as an increase.
    for kind in ["top_up", "usage", "refund", "adjustment"] {
        metrics::counter!("paygate_billing_ledger_writes_total", "kind" => kind).increment(0);
    }
    metrics::gauge!("paygate_billing_change_stream_subscribers").increment(0.0);
    let stop = CancellationToken::new();
    let feed = changes::ChangeFeed::start(db.clone(), stop.clone()).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<BillingAdminServer<grpc::AdminApi>>()
        .await;
    health
        .set_serving::<EntitlementsServer<grpc::EntitlementsApi>>()
        .await;
    let stop_probing = CancellationToken::new();
    let (database, probing) = health::start_probe(
        &db,
        health.clone(),
        &[
            <BillingAdminServer<grpc::AdminApi> as NamedService>::NAME,
            <EntitlementsServer<grpc::EntitlementsApi> as NamedService>::NAME,
        ],
        stop_probing.clone(),
    );
    let state = grpc::State { db, clock };
    let admin = BillingAdminServer::with_interceptor(
        grpc::AdminApi::new(state.clone()),
        RefuseWhileDatabaseDown {
            auth: proto::auth::BearerAuth::new(&tokens.admin),
            database: database.clone(),
        },
    );
    let entitlements = EntitlementsServer::with_interceptor(
        grpc::EntitlementsApi::new(state, feed.ending_while_unreachable(&database)),
        RefuseWhileDatabaseDown {
            auth: proto::auth::BearerAuth::new(&tokens.service),
            database,
        },
    );
    let reflection = reflection_builder().build_v1()?;
    let reflection_alpha = reflection_builder().build_v1alpha()?; // older grpcurl and tools speak only v1alpha

    let stop_accepting = async move {
        shutdown.await;
        // The probe must not report SERVING again once draining has begun.
        stop_probing.cancel();
        let _ = probing.await;
        // Lets load balancers stop routing here, and ends change streams so draining can finish.
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<BillingAdminServer<grpc::AdminApi>>()
            .await;
        health
            .set_not_serving::<EntitlementsServer<grpc::EntitlementsApi>>()
            .await;
        stop.cancel();
    };
    let GrpcListener { listener, tls } = listener.into();
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context(
            "PAYGATE_GRPC_TLS_CERT_FILE/PAYGATE_GRPC_TLS_KEY_FILE are not a usable pair",
        )?;
    }
    server
        .layer(telemetry::traces::GrpcTraceLayer::new("billing"))
        .layer(rpc_counter::CountRpcs)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(admin)
        .add_service(entitlements)
        // Nagle's algorithm would hold a reply's second segment for the peer's delayed ACK (tens of ms).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop_accepting,
        )
        .await?;
    Ok(())
}

/// Checks the caller's token, then refuses the call at once while the probe finds the database
/// unreachable: every billing call needs it, and waiting would only hold the caller until its deadline.
#[derive(Clone)]
struct RefuseWhileDatabaseDown {
    auth: proto::auth::BearerAuth,
    database: health::DatabaseHealth,
}

impl Interceptor for RefuseWhileDatabaseDown {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let request = self.auth.call(request)?;
        if !self.database.is_reachable() {
            return Err(Status::unavailable("billing database unavailable"));
        }
        Ok(request)
    }
}

/// Describes billing's services (not usage's, which share the descriptor set) plus health for reflection.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("billing.v1.BillingAdmin")
        .with_service_name("billing.v1.Entitlements")
        .with_service_name("grpc.health.v1.Health")
}
