//! The usage service in-process on port 0, against this process's Redis and a billing instance.

use std::{net::SocketAddr, time::Duration};

use proto::usage::v1::usage_client;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{service::interceptor::InterceptedService, transport::Channel};
use uuid::Uuid;

use crate::{BearerToken, BillingInstance, SERVICE_TOKEN};

/// A `Usage` client whose calls carry a bearer token.
pub type UsageClient = usage_client::UsageClient<InterceptedService<Channel, BearerToken>>;

/// How often in-process usage instances report to billing: often, so tests that wait for a report wait
/// little.
pub const TEST_REPORT_INTERVAL: Duration = Duration::from_millis(50);

/// How often in-process usage instances compare credit mirrors with billing's ledger: often, so a test of
/// a repair waits little (and every other test runs with the sweep busy beside it).
pub const TEST_RECONCILE_INTERVAL: Duration = Duration::from_millis(200);

/// Returns the URL of the Redis server tests use: `REDIS_URL` when set, otherwise a throwaway server this
/// test process starts on first use (AOF on, `everysec`, `noeviction`).
pub async fn redis_url() -> String {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return url;
    }
    let port = crate::run_blocking("starting redis", || crate::redis_server::server().port).await;
    format!("redis://127.0.0.1:{port}")
}

/// A Redis server of a test's own, with the given settings; it stops when dropped.
pub struct ExtraRedis {
    /// Its URL.
    pub url: String,
    _server: crate::redis_server::Server,
}

/// Starts a Redis server of the test's own with `settings` (for example `["--appendonly", "no"]`).
pub async fn start_extra_redis(settings: &'static [&'static str]) -> ExtraRedis {
    let server = crate::run_blocking("starting redis", move || {
        crate::redis_server::start_with(settings)
    })
    .await;
    ExtraRedis {
        url: format!("redis://127.0.0.1:{}", server.port),
        _server: server,
    }
}

/// Returns a key prefix no other test uses, so tests sharing a Redis never see each other's keys.
pub fn unique_prefix() -> String {
    format!("test-{}", Uuid::new_v4().simple())
}

/// Returns counters under `prefix` on the test Redis, with the scripts loaded.
pub async fn counters(prefix: &str) -> usage::Counters {
    counters_on(&redis_url().await, prefix).await.0
}

/// Returns counters under `prefix` on the Redis at `url`, and their connection.
async fn counters_on(url: &str, prefix: &str) -> (usage::Counters, redis::aio::ConnectionManager) {
    let connection = usage::connect_redis(url)
        .await
        .unwrap_or_else(|error| panic!("failed to connect to redis: {error:#}"));
    let counters = usage::Counters::new(connection.clone(), usage::Keys::new(prefix))
        .await
        .unwrap_or_else(|error| panic!("failed to load the usage scripts: {error}"));
    (counters, connection)
}

/// Returns a raw connection to the test Redis, for tests that inspect or corrupt keys.
pub async fn redis_connection() -> redis::aio::ConnectionManager {
    usage::connect_redis(&redis_url().await)
        .await
        .unwrap_or_else(|error| panic!("failed to connect to redis: {error:#}"))
}

/// A usage service running in this process.
pub struct UsageInstance {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its Redis key prefix.
    pub prefix: String,
    /// Its counters (the same Redis keys the service uses).
    pub counters: usage::Counters,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

/// Starts usage on a free port with a fresh key prefix, reporting to `billing`.
pub async fn spawn_usage(billing: &BillingInstance) -> UsageInstance {
    spawn_usage_with_prefix(billing, &unique_prefix()).await
}

/// Starts usage on a free port under `prefix` (instances with one prefix share their counters, like
/// replicas of one deployment), reporting to `billing`.
pub async fn spawn_usage_with_prefix(billing: &BillingInstance, prefix: &str) -> UsageInstance {
    spawn_usage_with(billing, prefix, TEST_REPORT_INTERVAL).await
}

/// Starts usage like `spawn_usage_with_prefix`, reporting every `report_interval` (a long one leaves
/// spending for the final report at shutdown).
pub async fn spawn_usage_with(
    billing: &BillingInstance,
    prefix: &str,
    report_interval: Duration,
) -> UsageInstance {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind a port for usage");
    serve_usage(
        billing,
        &redis_url().await,
        prefix,
        report_interval,
        listener,
    )
    .await
}

/// Starts usage under `prefix` granting leases under `leases` (for example a short lifetime, so a test of
/// a write-off waits little), reporting to `billing` every `TEST_REPORT_INTERVAL`.
pub async fn spawn_usage_with_leases(
    billing: &BillingInstance,
    prefix: &str,
    leases: usage::LeaseSettings,
) -> UsageInstance {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind a port for usage");
    serve_usage_leasing(
        billing,
        &redis_url().await,
        prefix,
        TEST_REPORT_INTERVAL,
        listener,
        leases,
    )
    .await
}

/// Starts usage on a free port with a fresh key prefix against the Redis at `redis_url` (for example a
/// `RestartableRedis`), reporting to `billing`.
pub async fn spawn_usage_on(billing: &BillingInstance, redis_url: &str) -> UsageInstance {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind a port for usage");
    serve_usage(
        billing,
        redis_url,
        &unique_prefix(),
        TEST_REPORT_INTERVAL,
        listener,
    )
    .await
}

/// Starts usage under `prefix` on the given address (a restart where a stopped instance was).
pub async fn spawn_usage_at(
    billing: &BillingInstance,
    prefix: &str,
    addr: std::net::SocketAddr,
) -> UsageInstance {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|error| panic!("failed to bind {addr} for usage: {error}"));
    serve_usage(
        billing,
        &redis_url().await,
        prefix,
        TEST_REPORT_INTERVAL,
        listener,
    )
    .await
}

async fn serve_usage(
    billing: &BillingInstance,
    redis_url: &str,
    prefix: &str,
    report_interval: Duration,
    listener: TcpListener,
) -> UsageInstance {
    serve_usage_leasing(
        billing,
        redis_url,
        prefix,
        report_interval,
        listener,
        usage::LeaseSettings::default(),
    )
    .await
}

async fn serve_usage_leasing(
    billing: &BillingInstance,
    redis_url: &str,
    prefix: &str,
    report_interval: Duration,
    listener: TcpListener,
    leases: usage::LeaseSettings,
) -> UsageInstance {
    let (counters, connection) = counters_on(redis_url, prefix).await;
    let counters = counters.with_lease_settings(leases);
    let probe = usage::RedisProbe::new(redis_url, connection)
        .unwrap_or_else(|error| panic!("bad redis URL: {error:#}"));
    usage::check_durability(&counters, false)
        .await
        .unwrap_or_else(|error| panic!("the test redis is not durable: {error:#}"));
    let billing_client = usage::billing_client(&format!("http://{}", billing.addr), SERVICE_TOKEN)
        .unwrap_or_else(|error| panic!("bad billing client: {error:#}"));
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let (stop, stopped) = oneshot::channel::<()>();
    let settings = usage::Settings {
        service_token: SERVICE_TOKEN.into(),
        report_interval,
        reconcile_interval: TEST_RECONCILE_INTERVAL,
    };
    let shutdown = async move {
        let _ = stopped.await;
    };
    let serve = usage::serve(
        listener,
        counters.clone(),
        probe,
        billing_client,
        settings,
        shutdown,
    );
    let task = tokio::spawn(async move { serve.await.map_err(|error| format!("{error:#}")) });
    UsageInstance {
        addr,
        prefix: prefix.to_owned(),
        counters,
        stop,
        task,
    }
}

impl UsageInstance {
    /// Stops the service (it reports pending spending first), waits for it, and panics if it failed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("usage failed: {error}"),
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("usage task was cancelled: {error}"),
            },
        }
    }

    /// Returns a `Usage` client that sends `SERVICE_TOKEN`.
    pub async fn client(&self) -> UsageClient {
        self.client_with_token(Some(SERVICE_TOKEN)).await
    }

    /// Returns a `Usage` client that sends `token`, or no `authorization` at all.
    pub async fn client_with_token(&self, token: Option<&str>) -> UsageClient {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("a socket address makes a valid URI")
            .connect()
            .await
            .unwrap_or_else(|error| panic!("failed to connect to usage at {}: {error}", self.addr));
        usage_client::UsageClient::with_interceptor(channel, BearerToken::new(token))
    }
}
