//! Backends that go away and come back: the harness's restartable Redis and PostgreSQL, and how usage and
//! billing answer while their backend is down and after it returns.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use integration_tests::{
    BillingInstance, free_plan, fresh_database, health_of, key_digest, keyed_customer,
    spawn_billing, spawn_restartable_postgres, spawn_restartable_redis, spawn_usage_on,
};
use proto::{
    billing::v1::{GetCustomerRequest, ResolveRequest},
    usage::v1::{AdmitRequest, Decision},
};
use sqlx::{Connection, PgConnection, postgres::PgPoolOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use uuid::Uuid;

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_killed_redis_starts_again_on_its_port_with_its_data() {
    let mut redis = spawn_restartable_redis(&[]).await;
    let url = redis.url();
    let mut connection = redis_connection(&url).await;
    let _: () = redis::cmd("SET")
        .arg("kept")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();

    redis.kill().await;
    let while_down = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    redis.start().await;
    let kept: Option<String> = redis::cmd("GET")
        .arg("kept")
        .query_async(&mut redis_connection(&redis.url()).await)
        .await
        .unwrap();

    assert!(while_down.is_err());
    assert_eq!(redis.url(), url);
    assert_eq!(kept.as_deref(), Some("1"));
}

#[tokio::test]
async fn a_redis_whose_append_only_file_was_cut_forgets_the_last_writes() {
    let mut redis = spawn_restartable_redis(&[]).await;
    let mut connection = redis_connection(&redis.url()).await;
    let empty = redis.aof_len();
    let _: () = redis::cmd("SET")
        .arg("early")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();
    let before_late_write = redis.wait_until_aof_longer_than(empty).await;
    let _: () = redis::cmd("SET")
        .arg("late")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();
    redis.wait_until_aof_longer_than(before_late_write).await;

    redis.kill().await;
    redis.truncate_aof_to(before_late_write);
    redis.start().await;
    let mut connection = redis_connection(&redis.url()).await;
    let early: Option<String> = redis::cmd("GET")
        .arg("early")
        .query_async(&mut connection)
        .await
        .unwrap();
    let late: Option<String> = redis::cmd("GET")
        .arg("late")
        .query_async(&mut connection)
        .await
        .unwrap();

    assert_eq!(early.as_deref(), Some("1"));
    assert_eq!(late, None);
}

#[tokio::test]
async fn a_crashed_postgres_starts_again_on_its_port_with_its_data() {
    let mut postgres = spawn_restartable_postgres().await;
    let url = postgres.database_url().to_owned();
    let mut connection = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE kept (id int)")
        .execute(&mut connection)
        .await
        .unwrap();

    postgres.kill().await;
    let while_down = PgConnection::connect(&url).await;
    postgres.start().await;
    let mut connection = PgConnection::connect(postgres.database_url())
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut connection)
        .await
        .unwrap();

    assert!(while_down.is_err());
    assert_eq!(rows, 0);
    assert_eq!(
        migrations,
        i64::try_from(billing::MIGRATOR.iter().count()).unwrap()
    );
}

/// Polls `condition` until it holds; returns how long that took, or panics after `limit`.
async fn time_until<F, Fut>(limit: Duration, what: &str, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what} not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Times one gRPC call; returns its code when it failed, and how long it took.
async fn timed<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> (Result<(), Code>, Duration) {
    let started = Instant::now();
    let outcome = call.await;
    (
        outcome.map(|_| ()).map_err(|status| status.code()),
        started.elapsed(),
    )
}

/// Asserts that every call was refused as UNAVAILABLE within a generous bound (the goal is 100 ms).
fn assert_refused_fast(refusals: &[(Result<(), Code>, Duration)]) {
    assert_refused_within(refusals, Duration::from_secs(1));
}

/// Asserts that every call was refused as UNAVAILABLE within `bound`.
fn assert_refused_within(refusals: &[(Result<(), Code>, Duration)], bound: Duration) {
    for (answer, took) in refusals {
        assert_eq!(*answer, Err(Code::Unavailable));
        assert!(*took <= bound, "a refusal took {took:?}");
    }
}

async fn admit_request(billing: &BillingInstance) -> AdmitRequest {
    let customer = keyed_customer(billing, Some(free_plan(1_000_000))).await;
    let entitlement = billing
        .entitlements()
        .await
        .resolve(ResolveRequest {
            key_digest: key_digest(&customer.secret),
        })
        .await
        .expect("entitlement")
        .into_inner();
    AdmitRequest {
        request_id: String::new(),
        customer_id: customer.id,
        subscription_id: entitlement.subscription_id,
        units: 1,
        limits: entitlement.limits,
        period_start: entitlement.period_start,
        period_end: entitlement.period_end,
    }
}

fn numbered(request: &AdmitRequest) -> AdmitRequest {
    AdmitRequest {
        request_id: Uuid::new_v4().to_string(),
        ..request.clone()
    }
}

#[tokio::test]
async fn usage_refuses_at_once_while_its_redis_is_down_and_serves_soon_after_it_returns() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut redis = spawn_restartable_redis(&[]).await;
    let usage = spawn_usage_on(&billing, &redis.url()).await;
    let mut client = usage.client().await;
    let request = admit_request(&billing).await;
    let before = client
        .admit(numbered(&request))
        .await
        .expect("admit")
        .into_inner();

    redis.kill().await;
    let mut refusals = Vec::new();
    for _ in 0..20 {
        refusals.push(timed(client.admit(numbered(&request))).await);
    }
    let not_serving = time_until(Duration::from_secs(3), "NOT_SERVING", || async {
        health_of(usage.addr, "usage.v1.Usage").await == Ok(ServingStatus::NotServing)
    })
    .await;
    let while_known_down = timed(client.admit(numbered(&request))).await;
    redis.start().await;
    let serving_again = time_until(Duration::from_secs(3), "an admission", || {
        let mut client = client.clone();
        let request = numbered(&request);
        async move { client.admit(request).await.is_ok() }
    })
    .await;
    let healthy_again = health_of(usage.addr, "usage.v1.Usage").await;
    let whole_server = health_of(usage.addr, "").await;

    eprintln!(
        "redis down: refusals took {:?}; NOT_SERVING after {not_serving:?}; once known down {:?}; admissions again {serving_again:?} after redis returned",
        refusals.iter().map(|(_, took)| *took).collect::<Vec<_>>(),
        while_known_down.1
    );
    assert_eq!(before.decision(), Decision::Admitted);
    assert_refused_fast(&refusals);
    assert_refused_fast(&[while_known_down]);
    assert_eq!(healthy_again, Ok(ServingStatus::Serving));
    assert_eq!(whole_server, Ok(ServingStatus::Serving));
}

#[tokio::test]
async fn billing_refuses_at_once_while_its_database_is_down_and_serves_soon_after_it_returns() {
    let mut postgres = spawn_restartable_postgres().await;
    let db = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(billing::DB_ACQUIRE_TIMEOUT)
        .connect(postgres.database_url())
        .await
        .expect("pool");
    let billing = spawn_billing(db).await;
    let customer = keyed_customer(&billing, Some(free_plan(1000))).await;
    let resolve = || ResolveRequest {
        key_digest: key_digest(&customer.secret),
    };
    let mut entitlements = billing.entitlements().await;
    let mut admin = billing.admin().await;
    let get_customer = || GetCustomerRequest {
        customer_id: customer.id.clone(),
        ..Default::default()
    };
    let before = entitlements.resolve(resolve()).await;

    postgres.kill().await;
    let mut refusals = Vec::new();
    for _ in 0..10 {
        refusals.push(timed(entitlements.resolve(resolve())).await);
        refusals.push(timed(admin.get_customer(get_customer())).await);
    }
    let not_serving = time_until(Duration::from_secs(3), "NOT_SERVING", || async {
        health_of(billing.addr, "billing.v1.Entitlements").await == Ok(ServingStatus::NotServing)
    })
    .await;
    let while_known_down = timed(entitlements.resolve(resolve())).await;
    postgres.start().await;
    let serving_again = time_until(Duration::from_secs(3), "a resolution", || {
        let mut entitlements = entitlements.clone();
        let request = resolve();
        async move { entitlements.resolve(request).await.is_ok() }
    })
    .await;
    let admin_again = admin.get_customer(get_customer()).await;
    let healthy_again = [
        health_of(billing.addr, "billing.v1.Entitlements").await,
        health_of(billing.addr, "billing.v1.BillingAdmin").await,
        health_of(billing.addr, "").await,
    ];

    eprintln!(
        "postgres down: refusals took {:?}; NOT_SERVING after {not_serving:?}; once known down {:?}; resolutions again {serving_again:?} after postgres returned",
        refusals.iter().map(|(_, took)| *took).collect::<Vec<_>>(),
        while_known_down.1
    );
    assert!(before.is_ok());
    // Calls made before the probe noticed may wait for a pool connection (DB_ACQUIRE_TIMEOUT: a busy pool
    // is not an outage); once it has noticed, every call is refused at once.
    assert_refused_within(
        &refusals,
        billing::DB_ACQUIRE_TIMEOUT + Duration::from_secs(1),
    );
    assert_refused_fast(&[while_known_down]);
    assert!(admin_again.is_ok());
    assert_eq!(healthy_again, [Ok(ServingStatus::Serving); 3]);
}
