//! The integration-test harness: fresh PostgreSQL databases, a throwaway Redis, the real billing and usage
//! services in-process on port 0, and authenticated gRPC clients for them.
//!
//! Layout:
//! - `postgres`: the throwaway PostgreSQL cluster a test process starts when `DATABASE_URL` is unset, and
//!   clusters of a test's own that it can crash and restart
//! - `redis_server`: the throwaway Redis server a test process starts when `REDIS_URL` is unset, and
//!   servers of a test's own that it can kill and restart
//! - `supervisor`: the shell that runs, signals, restarts and finally cleans up those servers
//! - `usage_service`: the usage service in-process, its clients and counters
//! - `gateway_service`: the gateway in-process, a scriptable upstream and an HTTP client
//! - `bench`: what the benchmark programs share (services as processes, killable PostgreSQL and Redis)
//! - `tls`: throwaway certificate authorities and the certificates they issue
//! - this file: `fresh_database`, `spawn_billing`, the clients and small request builders

pub mod bench;
mod gateway_service;
mod postgres;
mod redis_server;
mod supervisor;
pub mod tls;
mod usage_service;

pub use postgres::{
    RestartablePostgres, TlsPostgres, spawn_restartable_postgres, spawn_tls_postgres,
};
pub use redis_server::{RestartableRedis, TlsRedis, spawn_restartable_redis, spawn_tls_redis};

pub use gateway_service::{
    Answer, GatewayInstance, TEST_BACKEND_DEADLINE, Tarpit, Upstream, UpstreamBody, body, get,
    http_client, send, spawn_gateway, spawn_gateway_at, spawn_ok_upstream, spawn_tarpit,
    spawn_upstream,
};
pub use usage_service::{
    ExtraRedis, TEST_REPORT_INTERVAL, UsageClient, UsageInstance, counters, redis_connection,
    redis_url, spawn_usage, spawn_usage_at, spawn_usage_on, spawn_usage_with,
    spawn_usage_with_leases, spawn_usage_with_prefix, start_extra_redis, unique_prefix,
};

use std::{net::SocketAddr, sync::Arc};

use billing::ManualClock;
use proto::billing::v1::{
    BillingInterval, CreateCustomerRequest, CreatePlanRequest, CreateSubscriptionRequest,
    GetCustomerStatsRequest, IssueApiKeyRequest, OverageMode, PaymentOutcome, PaymentPurpose,
    RecordPaymentRequest, billing_admin_client::BillingAdminClient, entitlements_client,
};
use sha2::{Digest, Sha256};
use sqlx::{
    AssertSqlSafe, Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use time::{OffsetDateTime, macros::datetime};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ServerTlsConfig},
};
use uuid::Uuid;

/// The bearer token the billing instances require on `BillingAdmin`.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The bearer token the billing instances require on `Entitlements`.
pub const SERVICE_TOKEN: &str = "test-service-token";
/// Where the clock of `spawn_billing` starts.
pub const CLOCK_START: OffsetDateTime = datetime!(2026-01-15 12:00:00 UTC);

/// A `BillingAdmin` client whose calls carry a bearer token.
pub type AdminClient = BillingAdminClient<InterceptedService<Channel, BearerToken>>;
/// An `Entitlements` client whose calls carry a bearer token.
pub type EntitlementsClient =
    entitlements_client::EntitlementsClient<InterceptedService<Channel, BearerToken>>;

/// Returns a pool on a new, uniquely named database (`test_<uuid>`) with billing's migrations applied.
///
/// The database lives on the server `DATABASE_URL` names when it is set, otherwise on a throwaway cluster
/// this test process starts on first use and that stops when the process exits. Panics with one line saying
/// what to install when PostgreSQL is missing.
pub async fn fresh_database() -> PgPool {
    init_test_logging();
    let (server, name) = create_database("test").await;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(server.database(&name))
        .await
        .unwrap_or_else(|error| panic!("failed to connect to database `{name}`: {error}"));
    billing::MIGRATOR
        .run(&pool)
        .await
        .unwrap_or_else(|error| panic!("failed to migrate database `{name}`: {error}"));
    pool
}

/// Returns the URL of a new, empty, uniquely named database (`bench_<uuid>`) on the same server as
/// [`fresh_database`], for a service started as a separate process (which migrates it itself). A password
/// in `DATABASE_URL` is not carried over; use `PGPASSWORD`.
pub async fn empty_database_url() -> String {
    let (server, name) = create_database("bench").await;
    let host = server.get_host();
    let port = server.get_port();
    let user = server.get_username();
    format!("postgres://{user}@{host}:{port}/{name}?sslmode=disable")
}

/// Creates `<prefix>_<uuid>` on the test server; returns the server's options and the name.
async fn create_database(prefix: &str) -> (PgConnectOptions, String) {
    let server = server_options().await;
    let name = create_database_on(&server, prefix).await;
    (server, name)
}

/// Creates `<prefix>_<uuid>` on `server`; returns the name.
async fn create_database_on(server: &PgConnectOptions, prefix: &str) -> String {
    let name = format!("{prefix}_{}", Uuid::new_v4().simple());
    let mut maintenance = PgConnection::connect_with(server)
        .await
        .unwrap_or_else(|error| panic!("failed to connect to PostgreSQL: {error}"));
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut maintenance)
        .await
        .unwrap_or_else(|error| panic!("failed to create database `{name}`: {error}"));
    let _ = maintenance.close().await;
    name
}

async fn server_options() -> PgConnectOptions {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url
            .parse()
            .unwrap_or_else(|error| panic!("DATABASE_URL is not a PostgreSQL URL: {error}"));
    }
    let port = run_blocking("starting PostgreSQL", || postgres::cluster().port).await;
    postgres::server_options(port)
}

/// Runs `work` (which blocks, for example starting a server) on the blocking pool; its panic becomes the
/// caller's.
async fn run_blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("{what} was cancelled: {error}"),
        },
    }
}

fn init_test_logging() {
    // Several tests may share a process (`cargo test`); only the first one installs the subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A billing service running in this process, with a clock the test moves.
///
/// Stop it with `shutdown` to see whether it failed; dropping it also stops it, without waiting.
pub struct BillingInstance {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its clock; status, periods and grace follow it.
    pub clock: Arc<ManualClock>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

/// Starts billing on `db` on a free port, its clock standing at `CLOCK_START`.
pub async fn spawn_billing(db: PgPool) -> BillingInstance {
    spawn_billing_with_clock(db, Arc::new(ManualClock::new(CLOCK_START))).await
}

/// Starts billing on `db` on a free port with the given clock (share one clock between instances that
/// must agree on the time).
pub async fn spawn_billing_with_clock(db: PgPool, clock: Arc<ManualClock>) -> BillingInstance {
    spawn_billing_serving(db, clock, None).await
}

/// Starts billing on `db` on a free port serving gRPC over TLS only, with `tls` (for example
/// `proto::tls::server_config` of a certificate from a `TestCa`); its clock stands at `CLOCK_START`. Its
/// `admin` and `entitlements` clients trust nothing by themselves: use `channel_trusting`.
pub async fn spawn_billing_with_tls(db: PgPool, tls: ServerTlsConfig) -> BillingInstance {
    spawn_billing_serving(db, Arc::new(ManualClock::new(CLOCK_START)), Some(tls)).await
}

async fn spawn_billing_serving(
    db: PgPool,
    clock: Arc<ManualClock>,
    tls: Option<ServerTlsConfig>,
) -> BillingInstance {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind a port for billing");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let (stop, stopped) = oneshot::channel::<()>();
    let tokens = billing::Tokens {
        admin: ADMIN_TOKEN.into(),
        service: SERVICE_TOKEN.into(),
    };
    let shutdown = async move {
        // An error means the instance was dropped: stop as well.
        let _ = stopped.await;
    };
    let listener = proto::tls::GrpcListener::new(listener, tls);
    let serve = billing::serve(listener, db, tokens, clock.clone(), shutdown);
    let task = tokio::spawn(async move { serve.await.map_err(|error| format!("{error:#}")) });
    BillingInstance {
        addr,
        clock,
        stop,
        task,
    }
}

impl BillingInstance {
    /// Stops the service, waits until it has drained, and panics if it failed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("billing failed: {error}"),
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("billing task was cancelled: {error}"),
            },
        }
    }

    /// Returns a `BillingAdmin` client that sends `ADMIN_TOKEN`.
    pub async fn admin(&self) -> AdminClient {
        self.admin_with_token(Some(ADMIN_TOKEN)).await
    }

    /// Returns a `BillingAdmin` client that sends `token` as bearer token, or no `authorization` at all.
    pub async fn admin_with_token(&self, token: Option<&str>) -> AdminClient {
        BillingAdminClient::with_interceptor(self.channel().await, BearerToken::new(token))
    }

    /// Returns an `Entitlements` client that sends `SERVICE_TOKEN`.
    pub async fn entitlements(&self) -> EntitlementsClient {
        self.entitlements_with_token(Some(SERVICE_TOKEN)).await
    }

    /// Returns an `Entitlements` client that sends `token` as bearer token, or no `authorization` at all.
    pub async fn entitlements_with_token(&self, token: Option<&str>) -> EntitlementsClient {
        entitlements_client::EntitlementsClient::with_interceptor(
            self.channel().await,
            BearerToken::new(token),
        )
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a socket address makes a valid URI")
            .connect()
            .await
            .unwrap_or_else(|error| {
                panic!("failed to connect to billing at {}: {error}", self.addr)
            })
    }
}

/// Returns a connected channel to `https://<name>:<port of addr>` that trusts `ca` only; `name` is what
/// the server's certificate must be valid for (`localhost` or `127.0.0.1`). Panics when it cannot connect.
pub async fn channel_trusting(addr: SocketAddr, name: &str, ca: &Certificate) -> Channel {
    let endpoint =
        Channel::from_shared(format!("https://{name}:{}", addr.port())).expect("a valid URI");
    proto::tls::trust(endpoint, Some(ca))
        .expect("TLS settings")
        .connect()
        .await
        .unwrap_or_else(|error| panic!("failed to connect over TLS to {addr}: {error}"))
}

/// Returns what the gRPC health service at `addr` reports for `service` (`""`: the server as a whole);
/// `Err` with the call's code when the call itself fails (the server is gone: `Unavailable`; it does not
/// know the service: `NotFound`).
pub async fn health_of(
    addr: SocketAddr,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Code> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a socket address makes a valid URI")
        .connect()
        .await
        .map_err(|_| tonic::Code::Unavailable)?;
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| status.code())?;
    Ok(answer.into_inner().status())
}

/// Adds `authorization: Bearer <token>` to every call, or nothing when built without a token.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Returns an interceptor sending `token`; `None` sends no `authorization` entry.
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|token| {
            format!("Bearer {token}")
                .parse()
                .expect("test tokens are printable ASCII")
        }))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Wraps `message` in a request whose `paygate-actor` metadata names `actor`.
pub fn as_actor<T>(actor: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "paygate-actor",
        actor.parse().expect("actor names are printable ASCII"),
    );
    request
}

/// Returns a request for a USD customer with this external id.
pub fn customer_request(external_id: &str) -> CreateCustomerRequest {
    CreateCustomerRequest {
        external_id: external_id.into(),
        name: format!("Customer {external_id}"),
        email: format!("{external_id}@example.com"),
        currency: "USD".into(),
    }
}

/// Returns a request for a paid monthly USD plan: 10 USD a period, 1000 units, overage blocked, 3 days of
/// grace, no trial, no rate limit.
pub fn plan_request(code: &str) -> CreatePlanRequest {
    CreatePlanRequest {
        code: code.into(),
        name: format!("Plan {code}"),
        currency: "USD".into(),
        price_micros: 10_000_000,
        interval: BillingInterval::Month.into(),
        included_units: 1000,
        rate_limit: 0,
        rate_period_ms: 0,
        burst: 0,
        overage_mode: OverageMode::Block.into(),
        unit_price_micros: 0,
        grace_period_seconds: 3 * 24 * 60 * 60,
        trial_days: 0,
        features: vec!["search".into()],
    }
}

/// Returns a request recording a payment; `key` is its idempotency key.
pub fn payment_request(
    key: &str,
    customer_id: &str,
    purpose: PaymentPurpose,
    outcome: PaymentOutcome,
    amount_micros: i64,
) -> RecordPaymentRequest {
    RecordPaymentRequest {
        idempotency_key: key.into(),
        customer_id: customer_id.into(),
        purpose: purpose.into(),
        outcome: outcome.into(),
        amount_micros,
        provider_reference: format!("provider-{key}"),
        failure_reason: match outcome {
            PaymentOutcome::Failed => "card declined".into(),
            _ => String::new(),
        },
    }
}

/// Returns the SHA-256 digest of an API key, as gateways send it to `Entitlements.Resolve`.
pub fn key_digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Converts an instant to a protobuf timestamp.
pub fn timestamp(instant: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: instant.unix_timestamp(),
        nanos: i32::try_from(instant.nanosecond()).expect("nanoseconds fit in i32"),
    }
}

/// Converts a protobuf timestamp field to an instant; panics when it is unset or out of range.
pub fn instant(timestamp: &Option<prost_types::Timestamp>) -> OffsetDateTime {
    let timestamp = timestamp.as_ref().expect("timestamp is set");
    OffsetDateTime::from_unix_timestamp(timestamp.seconds).expect("timestamp in range")
        + time::Duration::nanoseconds(i64::from(timestamp.nanos))
}

/// A customer with one API key, subscribed to a plan when one was given.
pub struct KeyedCustomer {
    pub id: String,
    pub subscription_id: Option<String>,
    pub secret: String,
}

/// Creates a customer, subscribes it to a new plan made from `plan` (none: no subscription), and issues
/// it a key.
pub async fn keyed_customer(
    billing: &BillingInstance,
    plan: Option<CreatePlanRequest>,
) -> KeyedCustomer {
    let mut admin = billing.admin().await;
    let customer = admin
        .create_customer(customer_request(&Uuid::new_v4().to_string()))
        .await
        .expect("customer")
        .into_inner();
    let subscription_id = match plan {
        Some(plan) => {
            let plan = admin.create_plan(plan).await.expect("plan").into_inner();
            let subscription = admin
                .create_subscription(CreateSubscriptionRequest {
                    customer_id: customer.id.clone(),
                    plan_id: plan.id,
                })
                .await
                .expect("subscription")
                .into_inner();
            Some(subscription.id)
        }
        None => None,
    };
    let secret = admin
        .issue_api_key(IssueApiKeyRequest {
            customer_id: customer.id.clone(),
            name: "test".into(),
        })
        .await
        .expect("key")
        .into_inner()
        .secret;
    KeyedCustomer {
        id: customer.id,
        subscription_id,
        secret,
    }
}

/// Returns a free plan (price 0, uniquely coded) with `included_units` units, overage blocked.
pub fn free_plan(included_units: i64) -> CreatePlanRequest {
    CreatePlanRequest {
        price_micros: 0,
        included_units,
        ..plan_request(&format!("p{}", Uuid::new_v4().simple()))
    }
}

/// A customer's runtime statistics over the two hours either side of now, summed over the hours (a test
/// may straddle an hour).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StatsTotals {
    pub admitted: i64,
    /// Upstream answers: 2xx, 4xx, 5xx, other.
    pub upstream: [i64; 4],
    pub answered: std::collections::BTreeMap<String, i64>,
    pub units: i64,
    pub credits_micros: i64,
    /// Hours with a mean and a p95 upstream latency above zero.
    pub hours_with_latency: usize,
}

/// Reads `customer_id`'s statistics through the admin API.
pub async fn stats_totals(billing: &BillingInstance, customer_id: &str) -> StatsTotals {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let hours = billing
        .admin()
        .await
        .get_customer_stats(GetCustomerStatsRequest {
            customer_id: customer_id.to_owned(),
            from: Some(prost_types::Timestamp {
                seconds: now - 7_200,
                nanos: 0,
            }),
            to: Some(prost_types::Timestamp {
                seconds: now + 7_200,
                nanos: 0,
            }),
        })
        .await
        .expect("stats")
        .into_inner()
        .hours;
    let mut totals = StatsTotals::default();
    for hour in hours {
        totals.admitted += hour.admitted;
        totals.upstream[0] += hour.upstream_2xx;
        totals.upstream[1] += hour.upstream_4xx;
        totals.upstream[2] += hour.upstream_5xx;
        totals.upstream[3] += hour.upstream_other;
        for (code, count) in hour.answered {
            *totals.answered.entry(code).or_default() += count;
        }
        totals.units += hour.units;
        totals.credits_micros += hour.credits_micros;
        if hour.upstream_latency_mean_ms > 0.0 && hour.upstream_latency_p95_ms > 0.0 {
            totals.hours_with_latency += 1;
        }
    }
    totals
}
