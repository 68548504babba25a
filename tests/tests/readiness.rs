//! Liveness and readiness (DESIGN §8): the gateway's `/_paygate/ready` follows billing, usage and the
//! service token while `/_paygate/health` stays 200; billing and usage report NOT_SERVING on gRPC health,
//! for their named services and the server as a whole, while their database is down; and the gateway's
//! routes file reloads without dropping the routes in force when the new file is bad.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{
    Answer, SERVICE_TOKEN, free_plan, fresh_database, get, health_of, http_client, keyed_customer,
    send, spawn_billing, spawn_ok_upstream, spawn_restartable_postgres, spawn_restartable_redis,
    spawn_usage, spawn_usage_on,
};
use sqlx::postgres::PgPoolOptions;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic_health::pb::health_check_response::ServingStatus;

/// A gateway in this process, with its handle kept so a test can reload its routes.
struct TestGateway {
    addr: SocketAddr,
    gateway: Arc<gateway::Gateway>,
    _stop: oneshot::Sender<()>,
    _task: JoinHandle<()>,
}

impl TestGateway {
    async fn start(billing: SocketAddr, usage: SocketAddr, token: &str, routes: &str) -> Self {
        let (file, table) = gateway::routes::parse_routes_file(routes).expect("valid routes");
        let backends = gateway::backends::Backends::new(
            gateway::backends::channel(&format!("http://{billing}")).expect("billing URL"),
            gateway::backends::channel(&format!("http://{usage}")).expect("usage URL"),
            proto::auth::BearerToken::new(token).expect("a valid token"),
            Duration::from_secs(3),
        );
        let gateway = gateway::gateway(
            file,
            table,
            backends,
            Duration::from_secs(60),
            gateway::config::Leases::On,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = gateway::serve(listener, gateway.clone(), async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            serve.await.expect("the gateway serves");
        });
        Self {
            addr,
            gateway,
            _stop: stop,
            _task: task,
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        send(
            &http_client(),
            get(&format!("http://{}{path}", self.addr), headers),
        )
        .await
    }

    /// Asks `/_paygate/ready` until `accept` holds for its answer or `within` passes; returns the last
    /// answer either way.
    async fn ready_when(&self, within: Duration, accept: impl Fn(&Answer) -> bool) -> Answer {
        let deadline = Instant::now() + within;
        loop {
            let answer = self.get("/_paygate/ready", &[]).await;
            if accept(&answer) || Instant::now() >= deadline {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn routes_to(upstream: SocketAddr, prefixes: &[&str]) -> String {
    prefixes
        .iter()
        .map(|prefix| {
            format!("[[routes]]\nprefix = \"{prefix}\"\nupstream = \"http://{upstream}\"\n")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `condition` every 50 ms until it holds or `within` passes; returns whether it held.
async fn eventually<F, Fut>(within: Duration, condition: F) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

fn temp_file(contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("paygate-routes-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, contents).expect("routes file written");
    path
}

#[tokio::test]
async fn the_gateway_is_ready_once_billing_and_usage_accept_its_token_and_health_needs_no_key() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = TestGateway::start(
        billing.addr,
        usage.addr,
        SERVICE_TOKEN,
        &routes_to(upstream.addr, &["/v1"]),
    )
    .await;

    let ready = gateway
        .ready_when(Duration::from_secs(3), |answer| answer.status == 200)
        .await;
    let health = gateway.get("/_paygate/health", &[]).await;

    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(
        ready.json(),
        serde_json::json!({"ready": true, "routes": 1, "billing": "ready", "usage": "ready"})
    );
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn a_service_token_the_backends_refuse_makes_the_gateway_not_ready_but_alive() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = TestGateway::start(
        billing.addr,
        usage.addr,
        "a-token-nobody-accepts",
        &routes_to(upstream.addr, &["/v1"]),
    )
    .await;

    let ready = gateway
        .ready_when(Duration::from_secs(3), |answer| {
            answer.json()["billing"] != "not checked yet"
        })
        .await;
    let health = gateway.get("/_paygate/health", &[]).await;

    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["ready"], false);
    assert_eq!(ready.json()["billing"], "service token refused");
    assert_eq!(ready.json()["usage"], "service token refused");
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn unreachable_backends_make_the_gateway_not_ready_and_say_so() {
    let upstream = spawn_ok_upstream().await;
    let gateway = TestGateway::start(
        unused_addr(),
        unused_addr(),
        SERVICE_TOKEN,
        &routes_to(upstream.addr, &["/v1"]),
    )
    .await;

    let ready = gateway
        .ready_when(Duration::from_secs(3), |answer| {
            answer.json()["usage"] != "not checked yet"
        })
        .await;

    assert_eq!(ready.status, 503);
    for backend in ["billing", "usage"] {
        let reason = ready.json()[backend]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(reason.starts_with("unreachable"), "{backend}: {reason}");
    }
}

#[tokio::test]
async fn while_usage_has_no_redis_it_is_not_serving_on_every_health_name_and_the_gateway_is_not_ready()
 {
    let billing = spawn_billing(fresh_database().await).await;
    let mut redis = spawn_restartable_redis(&[]).await;
    let usage = spawn_usage_on(&billing, &redis.url()).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = TestGateway::start(
        billing.addr,
        usage.addr,
        SERVICE_TOKEN,
        &routes_to(upstream.addr, &["/v1"]),
    )
    .await;
    let ready_before = gateway
        .ready_when(Duration::from_secs(3), |answer| answer.status == 200)
        .await;

    redis.kill().await;
    let usage_not_serving = eventually(Duration::from_secs(3), || async {
        health_of(usage.addr, "usage.v1.Usage").await == Ok(ServingStatus::NotServing)
            && health_of(usage.addr, "").await == Ok(ServingStatus::NotServing)
    })
    .await;
    let not_ready = gateway
        .ready_when(Duration::from_secs(3), |answer| {
            answer.json()["usage"] == "not serving: counters unavailable"
        })
        .await;
    redis.start().await;
    let usage_serving = eventually(Duration::from_secs(3), || async {
        health_of(usage.addr, "usage.v1.Usage").await == Ok(ServingStatus::Serving)
            && health_of(usage.addr, "").await == Ok(ServingStatus::Serving)
    })
    .await;
    let ready_again = gateway
        .ready_when(Duration::from_secs(3), |answer| answer.status == 200)
        .await;

    assert_eq!(ready_before.status, 200, "{:?}", ready_before.body);
    assert!(
        usage_not_serving,
        "usage kept reporting SERVING without Redis"
    );
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.json()["billing"], "ready");
    assert_eq!(
        not_ready.json()["usage"],
        "not serving: counters unavailable"
    );
    assert!(
        usage_serving,
        "usage did not report SERVING after Redis returned"
    );
    assert_eq!(ready_again.status, 200, "{:?}", ready_again.body);
}

#[tokio::test]
async fn while_billing_has_no_database_it_is_not_serving_on_every_health_name() {
    let mut postgres = spawn_restartable_postgres().await;
    let db = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(billing::DB_ACQUIRE_TIMEOUT)
        .connect(postgres.database_url())
        .await
        .expect("pool");
    billing::MIGRATOR.run(&db).await.expect("migrated");
    let billing = spawn_billing(db).await;
    let names = ["billing.v1.Entitlements", "billing.v1.BillingAdmin", ""];
    let all_report = |wanted: ServingStatus| {
        let addr = billing.addr;
        async move {
            for name in names {
                if health_of(addr, name).await != Ok(wanted) {
                    return false;
                }
            }
            true
        }
    };
    let serving_before = all_report(ServingStatus::Serving).await;

    postgres.kill().await;
    let not_serving = eventually(Duration::from_secs(3), || {
        all_report(ServingStatus::NotServing)
    })
    .await;
    postgres.start().await;
    let serving_again = eventually(Duration::from_secs(3), || {
        all_report(ServingStatus::Serving)
    })
    .await;

    assert!(
        serving_before,
        "billing was not SERVING on every name at first"
    );
    assert!(
        not_serving,
        "billing kept reporting SERVING on some name without its database"
    );
    assert!(
        serving_again,
        "billing did not report SERVING on every name after its database returned"
    );
}

#[tokio::test]
async fn a_reloaded_routes_file_serves_its_new_routes_and_a_bad_one_keeps_the_old() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let customer = keyed_customer(&billing, Some(free_plan(1000))).await;
    let key = format!("Bearer {}", customer.secret);
    let gateway = TestGateway::start(
        billing.addr,
        usage.addr,
        SERVICE_TOKEN,
        &routes_to(upstream.addr, &["/v1"]),
    )
    .await;
    let before = gateway.get("/v2/items", &[("authorization", &key)]).await;

    let good = temp_file(&routes_to(upstream.addr, &["/v1", "/v2"]));
    let reloaded = gateway::reload_routes(&gateway.gateway, &good);
    let after_good = gateway.get("/v2/items", &[("authorization", &key)]).await;
    let bad = temp_file("[[routes]]\nprefix = \"/v3\"\nupstream = ");
    let refused = gateway::reload_routes(&gateway.gateway, &bad);
    let after_bad_v1 = gateway.get("/v1/items", &[("authorization", &key)]).await;
    let after_bad_v2 = gateway.get("/v2/items", &[("authorization", &key)]).await;
    let ready = gateway
        .ready_when(Duration::from_secs(3), |answer| answer.status == 200)
        .await;

    assert_eq!(before.status, 404);
    assert_eq!(reloaded.expect("the good file is applied"), 2);
    assert_eq!(after_good.status, 200, "{:?}", after_good.body);
    let error = format!("{:#}", refused.expect_err("the bad file is refused"));
    assert!(
        error.starts_with("GATEWAY_CONFIG `") && error.contains("not valid TOML at line 3"),
        "{error}"
    );
    assert_eq!(after_bad_v1.status, 200);
    assert_eq!(after_bad_v2.status, 200);
    assert_eq!(ready.json()["routes"], 2);
    assert_eq!(upstream.hits(), 3);
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}
