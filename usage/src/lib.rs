//! The usage service: exact admission (rate limit, period quota, prepaid credits) in one Redis round trip,
//! and the spending reports that turn admissions into billing's usage records and ledger rows.
//!
//! Layout:
//! - `config`: settings from flags and the environment
//! - `counters`: every Redis key and Lua script (`scripts/*.lua`)
//! - `grpc`: the `usage.v1.Usage` transport adapter
//! - `reports`: ships sealed spending to billing, exactly once per entry
//! - `feed`: applies billing's credit changes to loaded balances
//! - `reconcile`: repairs credit mirrors toward billing's ledger after Redis lost writes
//! - `error`: the service's error type and its mapping to gRPC status
//! - `health`: the Redis probe behind gRPC health and the refusal of calls while Redis is unreachable
//! - `leases`: lease recalls across replicas (Redis pub/sub) and the sweep that writes off lost leases

pub mod config;
pub mod counters;
pub mod error;
pub mod feed;
pub mod grpc;
pub mod health;
pub mod leases;
pub mod reconcile;
pub mod reports;

use std::{future::Future, path::Path, time::Duration};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Endpoint, Server, server::TcpIncoming};

use proto::{
    auth::BearerToken, billing::v1::entitlements_client::EntitlementsClient, tls::GrpcListener,
    usage::v1::usage_server::UsageServer,
};
use tonic::{Status, server::NamedService, service::Interceptor};

pub use config::Config;
pub use counters::{Counters, Keys, LeaseSettings};
pub use grpc::BillingClient;
pub use health::RedisProbe;

/// Settings `serve` needs beyond its connections.
#[derive(Clone)]
pub struct Settings {
    /// The token callers must present (and usage sends to billing).
    pub service_token: String,
    /// How often spending is reported to billing.
    pub report_interval: Duration,
    /// How often credit mirrors are compared with billing's ledger.
    pub reconcile_interval: Duration,
}

/// Returns a client of the Redis at `url`. A `rediss://` URL is served over TLS, the server verified
/// against the CA certificates in `ca_file` when given, else against the system roots; `ca_file` with a
/// plaintext URL is refused, since the operator evidently meant TLS.
pub fn redis_client(url: &str, ca_file: Option<&Path>) -> anyhow::Result<redis::Client> {
    let Some(ca_file) = ca_file else {
        return redis::Client::open(url).context("REDIS_URL is not a valid Redis URL");
    };
    if !url.starts_with("rediss://") {
        bail!("REDIS_CA_FILE is set but REDIS_URL is not a rediss:// URL");
    }
    let root_cert = proto::tls::read_ca(ca_file)
        .context("REDIS_CA_FILE")?
        .into_inner();
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        },
    )
    .context("REDIS_URL is not a valid Redis URL")
}

/// Connects to the Redis at `url` (plaintext, or TLS with the system roots for `rediss://`); see
/// [`connect_redis_with`].
pub async fn connect_redis(url: &str) -> anyhow::Result<redis::aio::ConnectionManager> {
    connect_redis_with(&redis_client(url, None)?).await
}

/// Connects to Redis through `client` (one multiplexed connection that reconnects on its own).
///
/// A lost connection is re-opened with a single attempt of at most `REDIS_CONNECT_TIMEOUT`, without
/// back-off: calls waiting on it fail at once while Redis refuses connections, and the next call (or the
/// health probe) tries again, so usage serves as soon as Redis is back. The response timeout stays long
/// because thousands of admissions may queue on the one connection; a Redis that stops answering is caught
/// by the probe (`health`) instead. A certificate that is not trusted is reported as such, naming
/// REDIS_CA_FILE.
pub async fn connect_redis_with(
    client: &redis::Client,
) -> anyhow::Result<redis::aio::ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
    let mut connection = client
        .get_connection_manager_with_config(config)
        .await
        .map_err(redis_connect_error)?;
    // A Redis restarting with a large append-only file answers LOADING until it has read it; usage waits
    // for it (a restarted stack would otherwise lose usage to a race it cannot win) rather than exit.
    let started = std::time::Instant::now();
    loop {
        let ping: redis::RedisResult<String> =
            redis::cmd("PING").query_async(&mut connection).await;
        match ping {
            Ok(_) => return Ok(connection),
            Err(error)
                if error.kind()
                    == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                    && started.elapsed() < REDIS_LOADING_LIMIT =>
            {
                tracing::info!("redis is loading its data; waiting");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(redis_connect_error(error)),
        }
    }
}

fn redis_connect_error(error: redis::RedisError) -> anyhow::Error {
    match proto::tls::certificate_rejection(&error) {
        Some(reason) => anyhow::anyhow!(
            "failed to connect to redis: its TLS certificate was not trusted (check REDIS_CA_FILE): {reason}"
        ),
        None => anyhow::Error::new(error).context("failed to connect to redis"),
    }
}

/// How long one attempt to (re)connect to Redis may take; longer than the gateway's deadline (250 ms)
/// serves no caller.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a command may wait for its answer on the shared connection.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long usage waits at start for its subscription to lease recalls.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(2);

/// How long usage waits at start for a Redis that is still loading its data.
const REDIS_LOADING_LIMIT: Duration = Duration::from_secs(300);

/// Refuses Redis setups that can lose spending silently: no append-only file, or an eviction policy that
/// may drop balances and outboxes. `allow_volatile` (development only) turns the refusal into a warning.
pub async fn check_durability(counters: &Counters, allow_volatile: bool) -> anyhow::Result<()> {
    let durability = counters
        .durability()
        .await
        .context("failed to read redis INFO")?;
    let mut problems = Vec::new();
    if !durability.aof_enabled {
        problems
            .push("appendonly is off (set `appendonly yes`, `appendfsync everysec`)".to_owned());
    }
    if durability.maxmemory_policy != "noeviction" {
        problems.push(format!(
            "maxmemory-policy is `{}` (set `noeviction`)",
            durability.maxmemory_policy
        ));
    }
    match (problems.is_empty(), allow_volatile) {
        (true, _) => Ok(()),
        (false, true) => {
            tracing::warn!(problems = %problems.join("; "), "redis may lose counters; allowed by USAGE_ALLOW_VOLATILE_REDIS");
            Ok(())
        }
        (false, false) => bail!(
            "redis may lose counters: {}; or set USAGE_ALLOW_VOLATILE_REDIS=true for development",
            problems.join("; ")
        ),
    }
}

/// Returns a billing client that sends `token` on every call; it connects on first use.
pub fn billing_client(url: &str, token: &str) -> anyhow::Result<BillingClient> {
    billing_client_trusting(url, token, None)
}

/// Returns a billing client like [`billing_client`] that verifies an `https://` billing against `ca`
/// (`None`: the system roots).
pub fn billing_client_trusting(
    url: &str,
    token: &str,
    ca: Option<&Certificate>,
) -> anyhow::Result<BillingClient> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("BILLING_URL `{url}` is not a valid URL"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let endpoint = proto::tls::trust(endpoint, ca)
        .with_context(|| format!("BILLING_URL `{url}`: TLS settings"))?;
    let token =
        BearerToken::new(token).context("PAYGATE_SERVICE_TOKEN is not valid in a header")?;
    Ok(EntitlementsClient::with_interceptor(
        endpoint.connect_lazy(),
        token,
    ))
}

/// Serves `usage.v1.Usage` (with health) on `listener` (TLS when it carries a certificate, else
/// plaintext) until `shutdown` completes; meanwhile reports spending to billing, follows billing's credit
/// changes and probes Redis with `redis` (health is NOT_SERVING, and calls are answered UNAVAILABLE at
/// once, while Redis is unreachable). On shutdown it drains in-flight calls, then reports what is pending
/// before returning.
pub async fn serve(
    listener: impl Into<GrpcListener>,
    counters: Counters,
    redis: RedisProbe,
    billing: BillingClient,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Every series exists from the start, so Prometheus' rate() sees the first event as an increase.
    for outcome in [
        "admitted",
        "rate_limited",
        "quota_exhausted",
        "credits_exhausted",
        "error",
    ] {
        metrics::counter!("paygate_usage_admissions_total", "outcome" => outcome).increment(0);
    }
    for lease_counter in [
        "paygate_usage_leases_granted_total",
        "paygate_usage_leases_returned_total",
        "paygate_usage_leases_recalled_total",
        "paygate_usage_leases_written_off_total",
    ] {
        metrics::counter!(lease_counter).increment(0);
    }
    metrics::gauge!("paygate_usage_outbox_customers").set(0.0);
    metrics::gauge!("paygate_usage_report_lag_seconds").set(0.0);
    let dirty = grpc::DirtyCustomers::default();
    let stop = CancellationToken::new();
    let reconciler = reconcile::Reconciler::new(counters.clone(), billing.clone());
    let reporter = reports::Reporter::new(
        counters.clone(),
        billing.clone(),
        dirty.clone(),
        reconciler.clone(),
    );
    let reporting = tokio::spawn(reporter.run(settings.report_interval, stop.clone()));
    tokio::spawn(reconciler.run(settings.reconcile_interval, stop.clone()));
    let following =
        tokio::spawn(feed::FeedFollower::new(counters.clone(), billing.clone()).run(stop.clone()));
    let broker = leases::RecallBroker::default();
    tokio::spawn(broker.clone().run(
        redis.client(),
        counters.keys().recall_channel(),
        counters.keys().returned_channel(),
        stop.clone(),
    ));
    tokio::spawn(leases::sweep(counters.clone(), stop.clone()));
    // A recall published before the subscription would be lost; serving a little later costs nothing.
    if !broker.wait_until_subscribed(SUBSCRIBE_LIMIT).await {
        tracing::warn!("lease recalls not subscribed yet; serving anyway");
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<UsageServer<grpc::UsageApi>>().await;
    let stop_probing = CancellationToken::new();
    let (redis_health, probing) = redis.start(
        health.clone(),
        &[<UsageServer<grpc::UsageApi> as NamedService>::NAME],
        stop_probing.clone(),
    );
    let api = UsageServer::with_interceptor(
        grpc::UsageApi::new(counters, billing, dirty, broker.clone()),
        RefuseWhileRedisDown {
            auth: proto::auth::BearerAuth::new(&settings.service_token),
            redis: redis_health,
        },
    );
    let stop_accepting = async move {
        shutdown.await;
        broker.close();
        // The probe must not report SERVING again once draining has begun.
        stop_probing.cancel();
        let _ = probing.await;
        health
            .set_not_serving::<UsageServer<grpc::UsageApi>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_alpha = reflection_builder().build_v1alpha()?; // older grpcurl and tools speak only v1alpha
    let GrpcListener { listener, tls } = listener.into();
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context(
            "PAYGATE_GRPC_TLS_CERT_FILE/PAYGATE_GRPC_TLS_KEY_FILE are not a usable pair",
        )?;
    }
    let served = server
        .layer(telemetry::traces::GrpcTraceLayer::new("usage"))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(api)
        // Nagle's algorithm would hold a reply's second segment for the peer's delayed ACK (tens of ms).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop_accepting,
        )
        .await;

    // Every admission is in Redis now; report it before going.
    stop.cancel();
    let _ = following.await;
    let _ = reporting.await;
    served?;
    Ok(())
}

/// Checks the caller's token, then refuses the call at once while the probe finds Redis unreachable:
/// every usage call needs Redis, and waiting for it would only hold the caller until its deadline.
#[derive(Clone)]
struct RefuseWhileRedisDown {
    auth: proto::auth::BearerAuth,
    redis: health::RedisHealth,
}

impl Interceptor for RefuseWhileRedisDown {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let request = self.auth.call(request)?;
        if !self.redis.is_reachable() {
            return Err(Status::unavailable("counters unavailable"));
        }
        Ok(request)
    }
}

/// Describes usage's service (not billing's, which share the descriptor set) plus health for reflection.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("usage.v1.Usage")
        .with_service_name("grpc.health.v1.Health")
}
