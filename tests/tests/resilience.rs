//! The gateway when billing or usage dies, comes back, or loses an answer: unknown keys never pass,
//! known ones ride out a billing outage for the stale window, traffic resumes within seconds of a
//! backend's return, and nothing is charged for a request that was not served.
//!
//! Services that die here run on a Tokio runtime of their own: killing one drops its runtime, which ends
//! every task and closes every socket at once, as a crash would, while the test process goes on.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use integration_tests::{
    Answer, BillingInstance, SERVICE_TOKEN, fresh_database, get, http_client, keyed_customer, send,
    spawn_billing_with_clock, spawn_ok_upstream, unique_prefix,
};
use proto::billing::v1::{CreatePlanRequest, GetCustomerSubscriptionRequest};
use sqlx::postgres::PgConnectOptions;
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, oneshot},
};

/// How long a recovering backend may take before traffic must flow again. The goal is a second; the
/// bound is generous because a debug build on a loaded 2-core machine is slow. `bench/faults` measures
/// the real figure.
const RECOVERY_BOUND: Duration = Duration::from_secs(3);

/// A service on a runtime of its own.
struct OwnRuntime {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OwnRuntime {
    /// Runs `start` on a new runtime and keeps what it returns alive until `kill`.
    async fn start<F, Fut, T>(start: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: 'static,
    {
        let (ready, started) = oneshot::channel::<()>();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            let held = runtime.block_on(start());
            let _ = ready.send(());
            let _ = stopped.recv();
            // Every task and socket of the service ends here, without any graceful step.
            runtime.shutdown_background();
            drop(held);
        });
        started.await.expect("the service started");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Ends the service at once.
    async fn kill(mut self) {
        self.end().await;
    }

    async fn end(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("joined")
                .expect("the service thread ended cleanly");
        }
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts billing on `addr` (port 0 for a free one) over the database `options` names.
async fn start_billing(options: PgConnectOptions, addr: SocketAddr) -> (OwnRuntime, SocketAddr) {
    let (bound, told) = oneshot::channel();
    let service = OwnRuntime::start(move || async move {
        let db = sqlx::postgres::PgPoolOptions::new()
            .connect_with(options)
            .await
            .expect("billing connects");
        let listener = TcpListener::bind(addr).await.expect("billing binds");
        let _ = bound.send(listener.local_addr().expect("an address"));
        let tokens = billing::Tokens {
            admin: integration_tests::ADMIN_TOKEN.into(),
            service: SERVICE_TOKEN.into(),
        };
        let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
        let serving = tokio::spawn(billing::serve(
            listener,
            db,
            tokens,
            clock,
            std::future::pending(),
        ));
        // Held, not awaited: the service runs until its runtime is dropped.
        (serving,)
    })
    .await;
    (service, told.await.expect("billing bound"))
}

/// Starts usage on `addr` (port 0 for a free one) under the Redis key `prefix` of the test Redis,
/// reporting to billing at `billing`.
async fn start_usage(
    billing: SocketAddr,
    prefix: String,
    addr: SocketAddr,
) -> (OwnRuntime, SocketAddr) {
    start_usage_on(integration_tests::redis_url().await, billing, prefix, addr).await
}

/// Starts usage like `start_usage`, on the Redis at `redis_url`.
async fn start_usage_on(
    redis_url: String,
    billing: SocketAddr,
    prefix: String,
    addr: SocketAddr,
) -> (OwnRuntime, SocketAddr) {
    let (bound, told) = oneshot::channel();
    let service = OwnRuntime::start(move || async move {
        let connection = usage::connect_redis(&redis_url)
            .await
            .expect("usage reaches redis");
        let probe = usage::RedisProbe::new(&redis_url, connection.clone()).expect("a redis URL");
        let counters = usage::Counters::new(connection, usage::Keys::new(&prefix))
            .await
            .expect("usage loads its scripts");
        let billing = usage::billing_client(&format!("http://{billing}"), SERVICE_TOKEN)
            .expect("a billing client");
        let listener = TcpListener::bind(addr).await.expect("usage binds");
        let _ = bound.send(listener.local_addr().expect("an address"));
        let settings = usage::Settings {
            service_token: SERVICE_TOKEN.into(),
            report_interval: Duration::from_millis(100),
            reconcile_interval: Duration::from_secs(60),
        };
        let serving = tokio::spawn(usage::serve(
            listener,
            counters,
            probe,
            billing,
            settings,
            std::future::pending(),
        ));
        // Held, not awaited: the service runs until its runtime is dropped.
        (serving,)
    })
    .await;
    (service, told.await.expect("usage bound"))
}

/// A gateway in this process asking billing and usage at the given addresses, with a short backend
/// deadline so that outages show quickly.
struct Gateway {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Gateway {
    async fn start(billing: SocketAddr, usage: SocketAddr, routes: &str) -> Self {
        let (file, table) = gateway::routes::parse_routes_file(routes).expect("valid routes");
        let backends = gateway::backends::Backends::new(
            gateway::backends::channel(&format!("http://{billing}")).expect("billing URL"),
            gateway::backends::channel(&format!("http://{usage}")).expect("usage URL"),
            proto::auth::BearerToken::new(SERVICE_TOKEN).expect("a token"),
            Duration::from_millis(500),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let gateway = gateway::gateway(
            file,
            table,
            backends,
            Duration::from_secs(60),
            gateway::config::Leases::On,
        );
        tokio::spawn(gateway::serve(listener, gateway, async move {
            let _ = stopped.await;
        }));
        Self { addr, _stop: stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A routes file with one route `/v1` to `upstream`; `extra` goes at the top (settings) and `route` into
/// the route (for example its failure mode).
fn routes(upstream: SocketAddr, extra: &str, route: &str) -> String {
    format!(
        r#"
        {extra}
        [[routes]]
        prefix = "/v1"
        upstream = "http://{upstream}"
        {route}
        "#
    )
}

const OPEN: &str = "failure_mode = \"open\"\nopen_budget = 1000";

fn plan(included_units: i64) -> CreatePlanRequest {
    integration_tests::free_plan(included_units)
}

/// Billing for the test's own use (issuing keys), beside which the gateway's billing runs and dies.
async fn admin_billing() -> (BillingInstance, PgConnectOptions) {
    let db = fresh_database().await;
    let options = (*db.connect_options()).clone();
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    (spawn_billing_with_clock(db, clock).await, options)
}

async fn ask(gateway: &Gateway, secret: &str) -> Answer {
    let client = http_client();
    send(
        &client,
        get(
            &gateway.url("/v1/x"),
            &[("authorization", &format!("Bearer {secret}"))],
        ),
    )
    .await
}

fn code(answer: &Answer) -> String {
    answer.json()["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Asks until an answer has `status`, at most until `limit` has passed; returns when it came.
async fn ask_until(
    gateway: &Gateway,
    secret: &str,
    status: StatusCode,
    limit: Duration,
) -> Instant {
    let started = Instant::now();
    loop {
        let answer = ask(gateway, secret).await;
        if answer.status == status {
            return Instant::now();
        }
        assert!(
            started.elapsed() < limit,
            "no {status} within {limit:?}; last answer {} {:?}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks with `secret` until an answer is not 200, which must be 503 `billing_unavailable` and come within
/// `limit` of `since`; returns how many were served before it and when it came.
async fn serve_until_refused(
    gateway: &Gateway,
    secret: &str,
    since: Instant,
    limit: Duration,
) -> (usize, Instant) {
    let mut served = 0;
    loop {
        let answer = ask(gateway, secret).await;
        if answer.status != StatusCode::OK {
            assert_eq!(code(&answer), "billing_unavailable", "{:?}", answer.body);
            return (served, Instant::now());
        }
        assert!(answer.headers.get("paygate-degraded").is_none());
        served += 1;
        assert!(
            since.elapsed() < limit,
            "still served {:?} after billing lost its footing",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn invented_keys_with_valid_checksums_never_pass_an_open_route_while_billing_is_down() {
    let (admin, options) = admin_billing().await;
    let (gateway_billing, billing_addr) =
        start_billing(options, "127.0.0.1:0".parse().unwrap()).await;
    let usage = integration_tests::spawn_usage(&admin).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = Gateway::start(billing_addr, usage.addr, &routes(upstream.addr, "", OPEN)).await;
    let never_asked = keyed_customer(&admin, Some(plan(100))).await;

    gateway_billing.kill().await;
    let mut answers = Vec::new();
    for _ in 0..20 {
        let random: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .chars()
            .chain("abcdefghijklmnopqrstuvwxyzABCDEFG".chars())
            .take(33)
            .collect();
        let invented = proto::api_key::assemble(&random);
        assert!(proto::api_key::is_well_formed(&invented));
        answers.push(ask(&gateway, &invented).await);
    }
    answers.push(ask(&gateway, &never_asked.secret).await);

    for answer in &answers {
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(code(answer), "billing_unavailable");
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_cached_entitlement_is_served_for_the_stale_window_while_billing_is_down_then_refused() {
    let (admin, options) = admin_billing().await;
    let (gateway_billing, billing_addr) =
        start_billing(options.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let usage = integration_tests::spawn_usage(&admin).await;
    let upstream = spawn_ok_upstream().await;
    let window = Duration::from_millis(2_000);
    let gateway = Gateway::start(
        billing_addr,
        usage.addr,
        &routes(upstream.addr, "entitlements_stale_for_ms = 2000", ""),
    )
    .await;
    let customer = keyed_customer(&admin, Some(plan(10_000))).await;
    assert_eq!(ask(&gateway, &customer.secret).await.status, StatusCode::OK);

    let killed = Instant::now();
    gateway_billing.kill().await;
    let (served, refused_at) =
        serve_until_refused(&gateway, &customer.secret, killed, window + RECOVERY_BOUND).await;
    let (_billing_again, _) = start_billing(options, billing_addr).await;
    let restarted = Instant::now();
    let served_again = ask_until(
        &gateway,
        &customer.secret,
        StatusCode::OK,
        RECOVERY_BOUND * 2,
    )
    .await;

    assert!(served > 0);
    assert!(
        refused_at.duration_since(killed) >= window,
        "refused after {:?}, inside the stale window",
        refused_at.duration_since(killed)
    );
    assert!(served_again.duration_since(restarted) <= RECOVERY_BOUND);
}

#[tokio::test]
async fn traffic_resumes_within_seconds_of_usage_coming_back_and_refusals_cost_nothing() {
    let (admin, _) = admin_billing().await;
    let prefix = unique_prefix();
    let (usage, usage_addr) =
        start_usage(admin.addr, prefix.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = Gateway::start(admin.addr, usage_addr, &routes(upstream.addr, "", "")).await;
    let customer = keyed_customer(&admin, Some(plan(10_000))).await;
    let mut admitted = 0;
    for _ in 0..3 {
        assert_eq!(ask(&gateway, &customer.secret).await.status, StatusCode::OK);
        admitted += 1;
    }

    usage.kill().await;
    ask_until(
        &gateway,
        &customer.secret,
        StatusCode::SERVICE_UNAVAILABLE,
        RECOVERY_BOUND,
    )
    .await;
    let (_usage_again, _) = start_usage(admin.addr, prefix.clone(), usage_addr).await;
    let restarted = Instant::now();
    let resumed = ask_until(
        &gateway,
        &customer.secret,
        StatusCode::OK,
        RECOVERY_BOUND * 2,
    )
    .await;
    admitted += 1;
    for _ in 0..3 {
        assert_eq!(ask(&gateway, &customer.secret).await.status, StatusCode::OK);
        admitted += 1;
    }

    assert!(
        resumed.duration_since(restarted) <= RECOVERY_BOUND,
        "traffic resumed {:?} after usage returned",
        resumed.duration_since(restarted)
    );
    let counters = integration_tests::counters(&prefix).await;
    let used = used_units(&admin, &counters, &customer).await;
    assert_eq!(used, admitted, "units taken differ from requests served");
}

#[tokio::test]
async fn traffic_resumes_within_seconds_of_billing_coming_back() {
    let (admin, options) = admin_billing().await;
    let (gateway_billing, billing_addr) =
        start_billing(options.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let usage = integration_tests::spawn_usage(&admin).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = Gateway::start(billing_addr, usage.addr, &routes(upstream.addr, "", "")).await;
    let first = keyed_customer(&admin, Some(plan(100))).await;
    assert_eq!(ask(&gateway, &first.secret).await.status, StatusCode::OK);

    gateway_billing.kill().await;
    let unseen = keyed_customer(&admin, Some(plan(100))).await;
    let refused = ask(&gateway, &unseen.secret).await;
    let (_billing_again, _) = start_billing(options, billing_addr).await;
    let restarted = Instant::now();
    let resumed = ask_until(&gateway, &unseen.secret, StatusCode::OK, RECOVERY_BOUND * 2).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        resumed.duration_since(restarted) <= RECOVERY_BOUND,
        "traffic resumed {:?} after billing returned",
        resumed.duration_since(restarted)
    );
}

#[tokio::test]
async fn traffic_resumes_within_seconds_of_redis_coming_back_and_refusals_cost_nothing() {
    let (admin, _) = admin_billing().await;
    let mut redis = integration_tests::spawn_restartable_redis(&[]).await;
    let (_usage, usage_addr) = start_usage_on(
        redis.url(),
        admin.addr,
        unique_prefix(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let upstream = spawn_ok_upstream().await;
    let gateway = Gateway::start(admin.addr, usage_addr, &routes(upstream.addr, "", "")).await;
    let customer = keyed_customer(&admin, Some(plan(10_000))).await;
    assert_eq!(ask(&gateway, &customer.secret).await.status, StatusCode::OK);

    redis.kill().await;
    ask_until(
        &gateway,
        &customer.secret,
        StatusCode::SERVICE_UNAVAILABLE,
        RECOVERY_BOUND,
    )
    .await;
    redis.start().await;
    let restarted = Instant::now();
    let resumed = ask_until(
        &gateway,
        &customer.secret,
        StatusCode::OK,
        RECOVERY_BOUND * 2,
    )
    .await;

    assert!(
        resumed.duration_since(restarted) <= RECOVERY_BOUND,
        "traffic resumed {:?} after redis returned",
        resumed.duration_since(restarted)
    );
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn a_cached_entitlement_is_served_while_billings_database_is_down_for_the_stale_window() {
    let mut postgres = integration_tests::spawn_restartable_postgres().await;
    let options: PgConnectOptions = postgres.database_url().parse().expect("a database URL");
    let admin_db = sqlx::PgPool::connect_with(options.clone())
        .await
        .expect("the database");
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    let admin = spawn_billing_with_clock(admin_db, clock).await;
    let (_gateway_billing, billing_addr) =
        start_billing(options, "127.0.0.1:0".parse().unwrap()).await;
    let usage = integration_tests::spawn_usage(&admin).await;
    let upstream = spawn_ok_upstream().await;
    let window = Duration::from_millis(2_000);
    let gateway = Gateway::start(
        billing_addr,
        usage.addr,
        &routes(upstream.addr, "entitlements_stale_for_ms = 2000", ""),
    )
    .await;
    let customer = keyed_customer(&admin, Some(plan(10_000))).await;
    let unseen = keyed_customer(&admin, Some(plan(10_000))).await;
    assert_eq!(ask(&gateway, &customer.secret).await.status, StatusCode::OK);

    let killed = Instant::now();
    postgres.kill().await;
    let unseen_while_down = ask(&gateway, &unseen.secret).await;
    let (served, refused_at) = serve_until_refused(
        &gateway,
        &customer.secret,
        killed,
        window + RECOVERY_BOUND * 2,
    )
    .await;
    postgres.start().await;
    let restarted = Instant::now();
    let served_again =
        ask_until(&gateway, &unseen.secret, StatusCode::OK, RECOVERY_BOUND * 2).await;

    assert_eq!(unseen_while_down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(served > 0);
    assert!(
        refused_at.duration_since(killed) >= window,
        "refused after {:?}, inside the stale window",
        refused_at.duration_since(killed)
    );
    assert!(
        served_again.duration_since(restarted) <= RECOVERY_BOUND,
        "served again {:?} after the database returned",
        served_again.duration_since(restarted)
    );
}

/// A TCP relay between the gateway and usage that can swallow usage's answers (they reach usage, whose
/// replies never come back), then heal by cutting every connection it holds.
struct Relay {
    addr: SocketAddr,
    swallowing: Arc<AtomicBool>,
    cut: Arc<Notify>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let swallowing = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Notify::new());
        let (flag, cut_all) = (swallowing.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (flag, cut_all) = (flag.clone(), cut_all.clone());
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upward = tokio::io::copy(&mut client_read, &mut server_write);
                    let downward = async {
                        let mut buffer = vec![0_u8; 16 * 1024];
                        loop {
                            let read = server_read.read(&mut buffer).await?;
                            if read == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !flag.load(Ordering::Acquire) {
                                client_write.write_all(&buffer[..read]).await?;
                            }
                        }
                    };
                    tokio::select! {
                        _ = upward => {}
                        _ = downward => {}
                        () = cut_all.notified() => {}
                    }
                });
            }
        });
        Self {
            addr,
            swallowing,
            cut,
        }
    }

    fn swallow(&self) {
        self.swallowing.store(true, Ordering::Release);
    }

    fn heal(&self) {
        self.swallowing.store(false, Ordering::Release);
        self.cut.notify_waiters();
    }
}

#[tokio::test]
async fn admissions_whose_answers_were_lost_are_given_back() {
    let (admin, _) = admin_billing().await;
    let usage = integration_tests::spawn_usage(&admin).await;
    let relay = Relay::start(usage.addr).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = Gateway::start(admin.addr, relay.addr, &routes(upstream.addr, "", "")).await;
    let customer = keyed_customer(&admin, Some(plan(10_000))).await;
    assert_eq!(ask(&gateway, &customer.secret).await.status, StatusCode::OK);

    relay.swallow();
    let lost = futures_join(&gateway, &customer.secret, 5).await;
    relay.heal();
    let after = ask_until(
        &gateway,
        &customer.secret,
        StatusCode::OK,
        RECOVERY_BOUND * 2,
    )
    .await;

    for answer in &lost {
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{:?}",
            answer.body
        );
    }
    let _ = after;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = used_units(&admin, &usage.counters, &customer).await;
        if used == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{used} units taken for the 2 requests served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upstream.hits(), 2);
}

/// Sends `count` requests at once and returns their answers.
async fn futures_join(gateway: &Gateway, secret: &str, count: usize) -> Vec<Answer> {
    let mut asking = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (url, key) = (gateway.url("/v1/x"), format!("Bearer {secret}"));
        asking.spawn(
            async move { send(&http_client(), get(&url, &[("authorization", &key)])).await },
        );
    }
    let mut answers = Vec::new();
    while let Some(answer) = asking.join_next().await {
        answers.push(answer.expect("a request task"));
    }
    answers
}

/// Returns the units taken in the customer's current period, as usage's counters hold them.
async fn used_units(
    admin: &BillingInstance,
    counters: &usage::Counters,
    customer: &integration_tests::KeyedCustomer,
) -> i64 {
    let subscription = admin
        .admin()
        .await
        .get_customer_subscription(GetCustomerSubscriptionRequest {
            customer_id: customer.id.clone(),
        })
        .await
        .expect("a subscription")
        .into_inner();
    let start = subscription.current_period_start.expect("a period");
    let period_start = start.seconds * 1000 + i64::from(start.nanos / 1_000_000);
    counters
        .usage(
            customer.id.parse().expect("uuid"),
            subscription.id.parse().expect("uuid"),
            period_start,
        )
        .await
        .expect("usage figures")
        .units_used
}
