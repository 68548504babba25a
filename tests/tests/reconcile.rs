//! Credit mirror reconciliation: usage's Redis mirror of each balance against billing's ledger, with real
//! Redis, billing (real PostgreSQL) and usage.

use std::time::Duration;

use integration_tests::{
    BillingInstance, RestartableRedis, SERVICE_TOKEN, TEST_REPORT_INTERVAL, UsageClient,
    UsageInstance, customer_request, fresh_database, plan_request, redis_connection, spawn_billing,
    spawn_restartable_redis, spawn_usage, unique_prefix,
};
use prost_types::Timestamp;
use proto::{
    billing::v1::{
        self as billing_pb, CreateSubscriptionRequest, GetCreditBalanceRequest,
        GrantCreditsRequest, Limits, OverageMode, ReportUsageRequest, UsageEntry,
    },
    usage::v1::{AdmitRequest, Decision, GetUsageRequest},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinSet};
use usage::{counters::Reconciled, reconcile::Reconciler};
use uuid::Uuid;

const PRICE: i64 = 1_000;

/// A customer whose every request is paid from credits, with the limits billing resolves for it.
#[derive(Clone)]
struct Spender {
    customer_id: String,
    subscription_id: String,
    limits: Limits,
    period_start: Timestamp,
    period_end: Timestamp,
}

impl Spender {
    fn admit(&self, request_id: &str) -> AdmitRequest {
        AdmitRequest {
            request_id: request_id.into(),
            customer_id: self.customer_id.clone(),
            subscription_id: self.subscription_id.clone(),
            units: 1,
            limits: Some(self.limits),
            period_start: Some(self.period_start),
            period_end: Some(self.period_end),
        }
    }

    fn customer(&self) -> Uuid {
        Uuid::parse_str(&self.customer_id).expect("billing ids are UUIDs")
    }
}

async fn spender(billing: &BillingInstance, credits_micros: i64) -> Spender {
    let mut admin = billing.admin().await;
    let plan = admin
        .create_plan(billing_pb::CreatePlanRequest {
            price_micros: 0,
            included_units: 0,
            overage_mode: OverageMode::Credits.into(),
            unit_price_micros: PRICE,
            ..plan_request(&format!("p{}", Uuid::new_v4().simple()))
        })
        .await
        .expect("plan")
        .into_inner();
    let customer = admin
        .create_customer(customer_request(&Uuid::new_v4().to_string()))
        .await
        .expect("customer")
        .into_inner();
    admin
        .create_subscription(CreateSubscriptionRequest {
            customer_id: customer.id.clone(),
            plan_id: plan.id,
        })
        .await
        .expect("subscription");
    let key = admin
        .issue_api_key(billing_pb::IssueApiKeyRequest {
            customer_id: customer.id.clone(),
            name: "test".into(),
        })
        .await
        .expect("key")
        .into_inner();
    admin
        .grant_credits(GrantCreditsRequest {
            customer_id: customer.id.clone(),
            amount_micros: credits_micros,
            reference: Uuid::new_v4().to_string(),
            note: String::new(),
        })
        .await
        .expect("grant");
    let entitlement = billing
        .entitlements()
        .await
        .resolve(billing_pb::ResolveRequest {
            key_digest: integration_tests::key_digest(&key.secret),
        })
        .await
        .expect("entitlement")
        .into_inner();
    Spender {
        customer_id: customer.id,
        subscription_id: entitlement.subscription_id,
        limits: entitlement.limits.expect("limits"),
        period_start: entitlement.period_start.expect("period start"),
        period_end: entitlement.period_end.expect("period end"),
    }
}

async fn ledger_balance(billing: &BillingInstance, spender: &Spender) -> i64 {
    billing
        .admin()
        .await
        .get_credit_balance(GetCreditBalanceRequest {
            customer_id: spender.customer_id.clone(),
        })
        .await
        .expect("balance")
        .into_inner()
        .balance_micros
}

/// The mirror as usage sees it: spendable credits and credits not yet reported.
async fn mirror(client: &mut UsageClient, spender: &Spender) -> (i64, i64) {
    let figures = client
        .get_usage(GetUsageRequest {
            customer_id: spender.customer_id.clone(),
            subscription_id: spender.subscription_id.clone(),
            period_start: Some(spender.period_start),
        })
        .await
        .expect("usage")
        .into_inner();
    (
        figures.credits_remaining_micros,
        figures.unreported_credits_micros,
    )
}

/// Waits until everything is reported and the mirror equals the ledger; returns both, or panics with what
/// they were at the deadline.
async fn settled(
    client: &mut UsageClient,
    billing: &BillingInstance,
    spender: &Spender,
) -> (i64, i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (spendable, unreported) = mirror(client, spender).await;
        let ledger = ledger_balance(billing, spender).await;
        if unreported == 0 && spendable == ledger {
            return (spendable, ledger);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mirror {spendable} (unreported {unreported}) never matched the ledger {ledger}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Admits one request after another until credits run out; returns how many were admitted.
async fn spend_everything(client: &mut UsageClient, spender: &Spender, tag: &str) -> i64 {
    let mut admitted = 0;
    loop {
        let answer = client
            .admit(spender.admit(&format!("{tag}-{admitted}")))
            .await
            .expect("admit")
            .into_inner();
        match answer.decision() {
            Decision::Admitted => admitted += 1,
            Decision::CreditsExhausted => return admitted,
            other => panic!("unexpected decision {other:?}"),
        }
    }
}

async fn set_mirror(usage: &UsageInstance, spender: &Spender, balance: i64) {
    let mut redis = redis_connection().await;
    let _: () = redis::cmd("HSET")
        .arg(usage.counters.keys().credits(spender.customer()))
        .arg("b")
        .arg(balance)
        .query_async(&mut redis)
        .await
        .expect("hset");
}

fn reconciler(usage: &UsageInstance, billing: &BillingInstance) -> Reconciler {
    let client = usage::billing_client(&format!("http://{}", billing.addr), SERVICE_TOKEN)
        .expect("billing client");
    Reconciler::new(usage.counters.clone(), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_repairs_a_mirror_set_too_high_and_one_set_too_low() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let spender = spender(&billing, 10 * PRICE).await;
    let mut client = usage.client().await;
    for index in 0..3 {
        let answer = client
            .admit(spender.admit(&format!("before-{index}")))
            .await
            .expect("admit")
            .into_inner();
        assert_eq!(answer.decision(), Decision::Admitted);
    }
    assert_eq!(
        settled(&mut client, &billing, &spender).await,
        (7 * PRICE, 7 * PRICE)
    );

    set_mirror(&usage, &spender, 50 * PRICE).await;
    let after_too_high = settled(&mut client, &billing, &spender).await;
    set_mirror(&usage, &spender, PRICE / 2).await;
    let after_too_low = settled(&mut client, &billing, &spender).await;
    let admitted = spend_everything(&mut client, &spender, "after").await;
    let (_, ledger_after_spending) = settled(&mut client, &billing, &spender).await;

    assert_eq!(after_too_high, (7 * PRICE, 7 * PRICE));
    assert_eq!(after_too_low, (7 * PRICE, 7 * PRICE));
    assert_eq!(admitted, 7);
    assert_eq!(ledger_after_spending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_and_reports_never_look_like_a_mirror_to_repair() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let spender = spender(&billing, 400 * PRICE).await;
    let reconciler = reconciler(&usage, &billing);
    let client = usage.client().await;

    let mut admissions = JoinSet::new();
    for worker in 0..8 {
        let mut client = client.clone();
        let spender = spender.clone();
        admissions.spawn(async move {
            let mut admitted = 0;
            for index in 0..60 {
                let answer = client
                    .admit(spender.admit(&format!("w{worker}-{index}")))
                    .await
                    .expect("admit")
                    .into_inner();
                if answer.decision() == Decision::Admitted {
                    admitted += 1;
                }
            }
            admitted
        });
    }
    let mut outcomes = Vec::new();
    let mut admitted = 0;
    while !admissions.is_empty() {
        outcomes.push(
            reconciler
                .reconcile(spender.customer())
                .await
                .expect("reconcile"),
        );
        while let Some(finished) = admissions.try_join_next() {
            admitted += finished.expect("admissions");
        }
    }
    let settled = settled(&mut client.clone(), &billing, &spender).await;

    let repairs: Vec<_> = outcomes
        .iter()
        .flatten()
        .filter(|outcome| matches!(outcome.reconciled, Reconciled::Repaired { .. }))
        .collect();
    assert!(repairs.is_empty(), "false repairs: {repairs:?}");
    assert!(
        outcomes
            .iter()
            .flatten()
            .any(|outcome| matches!(outcome.reconciled, Reconciled::Matched { .. })),
        "no reconciliation compared anything: {outcomes:?}"
    );
    assert_eq!(admitted, 400);
    assert_eq!(settled, (0, 0));
}

/// A usage instance on a Redis of the test's own; it runs until dropped.
struct UsageOnRedis {
    client: UsageClient,
    counters: usage::Counters,
    _stop: oneshot::Sender<()>,
}

async fn spawn_usage_on(
    billing: &BillingInstance,
    redis_url: &str,
    prefix: &str,
    report_interval: Duration,
    reconcile_interval: Duration,
) -> UsageOnRedis {
    let connection = usage::connect_redis(redis_url).await.expect("redis");
    let probe = usage::RedisProbe::new(redis_url, connection.clone()).expect("a redis URL");
    let counters = usage::Counters::new(connection, usage::Keys::new(prefix))
        .await
        .expect("scripts");
    let billing_client = usage::billing_client(&format!("http://{}", billing.addr), SERVICE_TOKEN)
        .expect("billing client");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let settings = usage::Settings {
        service_token: SERVICE_TOKEN.into(),
        report_interval,
        reconcile_interval,
    };
    tokio::spawn(usage::serve(
        listener,
        counters.clone(),
        probe,
        billing_client,
        settings,
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to usage");
    UsageOnRedis {
        client: proto::usage::v1::usage_client::UsageClient::with_interceptor(
            channel,
            integration_tests::BearerToken::new(Some(SERVICE_TOKEN)),
        ),
        counters,
        _stop: stop,
    }
}

/// Returns an append-only file length that holds every write Redis made before this call: a crash cut
/// back to it loses only what comes after.
async fn aof_cut_point(redis: &RestartableRedis) -> u64 {
    let before = redis.aof_len();
    let mut connection = usage::connect_redis(&redis.url()).await.expect("redis");
    let _: () = redis::cmd("SET")
        .arg(format!("marker-{}", Uuid::new_v4()))
        .arg(1)
        .query_async(&mut connection)
        .await
        .expect("set");
    redis.wait_until_aof_longer_than(before).await
}

async fn crash_back_to(redis: &mut RestartableRedis, cut: u64) {
    redis.kill().await;
    redis.truncate_aof_to(cut);
    redis.start().await;
}

/// Reads the mirror straight from Redis: spendable credits, and credits in the open outbox.
async fn raw_mirror(redis: &RestartableRedis, prefix: &str, spender: &Spender) -> (i64, i64) {
    let keys = usage::Keys::new(prefix);
    let mut connection = usage::connect_redis(&redis.url()).await.expect("redis");
    let spendable: i64 = redis::cmd("HGET")
        .arg(keys.credits(spender.customer()))
        .arg("b")
        .query_async(&mut connection)
        .await
        .expect("hget");
    let open: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg(keys.outbox(spender.customer()))
        .query_async(&mut connection)
        .await
        .expect("hgetall");
    let open_credits = open
        .iter()
        .filter(|(field, _)| field.starts_with("c|"))
        .map(|(_, credits)| credits)
        .sum();
    (spendable, open_credits)
}

async fn admit_all(client: &mut UsageClient, spender: &Spender, tag: &str, count: usize) {
    for index in 0..count {
        let answer = client
            .admit(spender.admit(&format!("{tag}-{index}")))
            .await
            .expect("admit")
            .into_inner();
        assert_eq!(
            answer.decision(),
            Decision::Admitted,
            "request {tag}-{index}"
        );
    }
}

const LONG: Duration = Duration::from_secs(3_600);
const SHORT: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_redis_loses_reported_spending_the_mirror_is_reloaded_and_no_credit_is_spent_twice() {
    let mut redis = spawn_restartable_redis(&[]).await;
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let mut first =
        spawn_usage_on(&billing, &redis.url(), &prefix, TEST_REPORT_INTERVAL, LONG).await;
    let spender = spender(&billing, 100 * PRICE).await;
    admit_all(&mut first.client, &spender, "kept", 20).await;
    assert_eq!(
        settled(&mut first.client, &billing, &spender).await,
        (80 * PRICE, 80 * PRICE)
    );
    let cut = aof_cut_point(&redis).await;
    admit_all(&mut first.client, &spender, "lost", 30).await;
    assert_eq!(
        settled(&mut first.client, &billing, &spender).await,
        (50 * PRICE, 50 * PRICE)
    );

    crash_back_to(&mut redis, cut).await;
    let mirror_after_crash = raw_mirror(&redis, &prefix, &spender).await;
    let mut second =
        spawn_usage_on(&billing, &redis.url(), &prefix, TEST_REPORT_INTERVAL, SHORT).await;
    let reconciled = settled(&mut second.client, &billing, &spender).await;
    let admitted_afterwards = spend_everything(&mut second.client, &spender, "after").await;
    let (_, ledger_at_the_end) = settled(&mut second.client, &billing, &spender).await;

    assert_eq!(
        mirror_after_crash,
        (80 * PRICE, 0),
        "the crash lost reported spending"
    );
    assert_eq!(reconciled, (50 * PRICE, 50 * PRICE));
    assert_eq!(admitted_afterwards, 50);
    assert_eq!(ledger_at_the_end, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spending_whose_seal_redis_lost_after_billing_charged_it_is_not_charged_again() {
    let mut redis = spawn_restartable_redis(&[]).await;
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let mut first = spawn_usage_on(&billing, &redis.url(), &prefix, LONG, LONG).await;
    let spender = spender(&billing, 100 * PRICE).await;
    admit_all(&mut first.client, &spender, "kept", 30).await;
    let cut = aof_cut_point(&redis).await;
    // What the reporter does, by hand, so it happens after the cut point.
    let sealed = first
        .counters
        .seal(spender.customer())
        .await
        .expect("seal")
        .expect("spending");
    let answer = billing
        .entitlements()
        .await
        .report_usage(ReportUsageRequest {
            report_id: Uuid::new_v4().to_string(),
            entries: sealed
                .spend
                .iter()
                .map(|spend| UsageEntry {
                    entry_id: format!(
                        "{}:{}:{}",
                        sealed.id, spend.subscription, spend.period_start_ms
                    ),
                    customer_id: spender.customer_id.clone(),
                    subscription_id: spend.subscription.to_string(),
                    period_start: Some(spender.period_start),
                    units: spend.units,
                    credits_micros: spend.credits_micros,
                    outbox_sequence: sealed.sequence,
                })
                .collect(),
        })
        .await
        .expect("report")
        .into_inner();
    let billed = answer.outbox_sequences[&spender.customer_id];
    first
        .counters
        .acknowledge(spender.customer(), &sealed.id, billed)
        .await
        .expect("ack");
    let ledger_before_crash = ledger_balance(&billing, &spender).await;

    crash_back_to(&mut redis, cut).await;
    let unsealed_after_crash = raw_mirror(&redis, &prefix, &spender).await;
    let mut second =
        spawn_usage_on(&billing, &redis.url(), &prefix, TEST_REPORT_INTERVAL, SHORT).await;
    let reconciled = settled(&mut second.client, &billing, &spender).await;
    let admitted_afterwards = spend_everything(&mut second.client, &spender, "after").await;
    let (_, ledger_at_the_end) = settled(&mut second.client, &billing, &spender).await;

    assert_eq!(ledger_before_crash, 70 * PRICE);
    assert_eq!(
        unsealed_after_crash,
        (70 * PRICE, 30 * PRICE),
        "the crash lost the seal, not the spending"
    );
    assert_eq!(reconciled, (70 * PRICE, 70 * PRICE));
    assert_eq!(admitted_afterwards, 70);
    assert_eq!(ledger_at_the_end, 0);
}
