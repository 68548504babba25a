//! The usage service against real Redis and a real billing service (real PostgreSQL).

use std::{collections::HashMap, time::Duration};

use integration_tests::{
    BillingInstance, UsageClient, counters, customer_request, fresh_database, plan_request,
    redis_connection, spawn_billing, spawn_usage, spawn_usage_with, spawn_usage_with_prefix,
    start_extra_redis, unique_prefix,
};
use prost_types::Timestamp;
use proto::{
    billing::v1::{
        self as billing_pb, CreateSubscriptionRequest, GetCreditBalanceRequest,
        GetCustomerUsageRequest, GrantCreditsRequest, Limits, OverageMode, ReportUsageRequest,
        UsageEntry,
    },
    usage::v1::{AdmitBatchRequest, AdmitRequest, Decision, GetUsageRequest, RefundRequest},
};
use tokio::task::JoinSet;
use tonic::Code;
use uuid::Uuid;

/// A customer with a live subscription and the limits billing resolves for it.
#[derive(Clone)]
struct Subscriber {
    customer_id: String,
    subscription_id: String,
    limits: Limits,
    period_start: Timestamp,
    period_end: Timestamp,
}

impl Subscriber {
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

    fn subscription(&self) -> Uuid {
        Uuid::parse_str(&self.subscription_id).expect("billing ids are UUIDs")
    }

    fn period_start_ms(&self) -> i64 {
        self.period_start.seconds * 1000 + i64::from(self.period_start.nanos / 1_000_000)
    }
}

fn free_plan(code: &str, included_units: i64) -> billing_pb::CreatePlanRequest {
    billing_pb::CreatePlanRequest {
        price_micros: 0,
        included_units,
        ..plan_request(code)
    }
}

fn credits_plan(
    code: &str,
    included_units: i64,
    unit_price_micros: i64,
) -> billing_pb::CreatePlanRequest {
    billing_pb::CreatePlanRequest {
        overage_mode: OverageMode::Credits.into(),
        unit_price_micros,
        ..free_plan(code, included_units)
    }
}

async fn subscribe(billing: &BillingInstance, plan: billing_pb::CreatePlanRequest) -> Subscriber {
    let mut admin = billing.admin().await;
    let plan = admin.create_plan(plan).await.expect("plan").into_inner();
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
    let entitlement = billing
        .entitlements()
        .await
        .resolve(billing_pb::ResolveRequest {
            key_digest: integration_tests::key_digest(&key.secret),
        })
        .await
        .expect("entitlement")
        .into_inner();
    Subscriber {
        customer_id: customer.id,
        subscription_id: entitlement.subscription_id,
        limits: entitlement.limits.expect("limits"),
        period_start: entitlement.period_start.expect("period start"),
        period_end: entitlement.period_end.expect("period end"),
    }
}

async fn grant(billing: &BillingInstance, subscriber: &Subscriber, amount_micros: i64) {
    billing
        .admin()
        .await
        .grant_credits(GrantCreditsRequest {
            customer_id: subscriber.customer_id.clone(),
            amount_micros,
            reference: Uuid::new_v4().to_string(),
            note: String::new(),
        })
        .await
        .expect("grant");
}

async fn billing_balance(billing: &BillingInstance, subscriber: &Subscriber) -> i64 {
    billing
        .admin()
        .await
        .get_credit_balance(GetCreditBalanceRequest {
            customer_id: subscriber.customer_id.clone(),
        })
        .await
        .expect("balance")
        .into_inner()
        .balance_micros
}

async fn usage_figures(
    client: &mut UsageClient,
    subscriber: &Subscriber,
) -> proto::usage::v1::GetUsageResponse {
    client
        .get_usage(GetUsageRequest {
            customer_id: subscriber.customer_id.clone(),
            subscription_id: subscriber.subscription_id.clone(),
            period_start: Some(subscriber.period_start),
        })
        .await
        .expect("usage")
        .into_inner()
}

/// Sends `requests` concurrently, round-robin over `clients`, and counts the decisions.
async fn admit_concurrently(
    clients: &[UsageClient],
    requests: Vec<AdmitRequest>,
) -> (HashMap<Decision, usize>, Vec<i64>) {
    let mut tasks = JoinSet::new();
    for (index, request) in requests.into_iter().enumerate() {
        let mut client = clients[index % clients.len()].clone();
        tasks.spawn(async move { client.admit(request).await.expect("admit").into_inner() });
    }
    let mut decisions = HashMap::new();
    let mut balances = Vec::new();
    while let Some(answer) = tasks.join_next().await {
        let answer = answer.expect("task");
        *decisions.entry(answer.decision()).or_default() += 1;
        balances.push(answer.credits_remaining_micros);
    }
    (decisions, balances)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_concurrent_admissions_on_two_instances_admit_exactly_the_quota() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let first = spawn_usage_with_prefix(&billing, &prefix).await;
    let second = spawn_usage_with_prefix(&billing, &prefix).await;
    let subscriber = subscribe(&billing, free_plan("quota-1000", 1000)).await;
    let clients = vec![
        first.client().await,
        second.client().await,
        first.client().await,
        second.client().await,
    ];
    let requests = (0..10_000)
        .map(|index| subscriber.admit(&format!("req-{index}")))
        .collect();

    let (decisions, _) = admit_concurrently(&clients, requests).await;

    assert_eq!(decisions.get(&Decision::Admitted), Some(&1_000));
    assert_eq!(decisions.get(&Decision::QuotaExhausted), Some(&9_000));
    assert_eq!(
        usage_figures(&mut clients[0].clone(), &subscriber)
            .await
            .units_used,
        1_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_for_three_hundred_requests_admit_exactly_three_hundred_of_three_thousand() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, credits_plan("prepaid", 0, 1_000)).await;
    grant(&billing, &subscriber, 300 * 1_000).await;
    let clients = vec![usage.client().await, usage.client().await];
    let requests = (0..3_000)
        .map(|index| subscriber.admit(&format!("req-{index}")))
        .collect();

    let (decisions, balances) = admit_concurrently(&clients, requests).await;

    assert_eq!(decisions.get(&Decision::Admitted), Some(&300));
    assert_eq!(decisions.get(&Decision::CreditsExhausted), Some(&2_700));
    assert!(
        balances.iter().all(|&balance| balance >= 0),
        "a balance went negative"
    );
    assert_eq!(
        usage_figures(&mut clients[0].clone(), &subscriber)
            .await
            .credits_remaining_micros,
        0
    );
}

#[tokio::test]
async fn a_burst_beyond_the_rate_limit_admits_the_burst_and_says_when_to_retry() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let plan = billing_pb::CreatePlanRequest {
        rate_limit: 10,
        rate_period_ms: 1_000,
        burst: 5,
        ..free_plan("rate-limited", 1_000)
    };
    let subscriber = subscribe(&billing, plan).await;
    let mut client = usage.client().await;
    let burst = (0..8)
        .map(|index| subscriber.admit(&format!("burst-{index}")))
        .collect();

    let answers = client
        .admit_batch(AdmitBatchRequest { requests: burst })
        .await
        .expect("batch")
        .into_inner()
        .decisions;
    let admitted = answers
        .iter()
        .filter(|answer| answer.decision() == Decision::Admitted)
        .count();
    let first_refusal = answers
        .iter()
        .find(|answer| answer.decision() == Decision::RateLimited)
        .expect("a refusal");
    tokio::time::sleep(Duration::from_millis(first_refusal.retry_after_ms)).await;
    let after_waiting = client
        .admit(subscriber.admit("after-waiting"))
        .await
        .expect("admit")
        .into_inner();

    assert_eq!(admitted, 5);
    assert_eq!(
        answers
            .iter()
            .filter(|answer| answer.decision() == Decision::RateLimited)
            .count(),
        3
    );
    // One emission interval is 100 ms; the batch ran within a few ms of its first admission.
    assert!(
        (90..=100).contains(&first_refusal.retry_after_ms),
        "retry_after_ms = {}",
        first_refusal.retry_after_ms
    );
    assert_eq!(after_waiting.decision(), Decision::Admitted);
}

#[tokio::test]
async fn an_admission_arriving_after_its_own_refund_takes_nothing() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, free_plan("refunded-first", 1)).await;
    let mut client = usage.client().await;
    let refund_request = RefundRequest {
        request_id: "late".into(),
        customer_id: subscriber.customer_id.clone(),
        ..Default::default()
    };

    let early_refund = client
        .refund(refund_request.clone())
        .await
        .expect("refund")
        .into_inner();
    let late_admission = client
        .admit(subscriber.admit("late"))
        .await
        .expect("admit")
        .into_inner();
    let second_refund = client
        .refund(refund_request)
        .await
        .expect("refund")
        .into_inner();
    let used = usage_figures(&mut client, &subscriber).await.units_used;
    let another = client
        .admit(subscriber.admit("other"))
        .await
        .expect("admit")
        .into_inner();

    assert!(!early_refund.refunded);
    assert_ne!(late_admission.decision(), Decision::Admitted);
    assert!(late_admission.replayed);
    assert!(!second_refund.refunded);
    assert_eq!(used, 0);
    assert_eq!(another.decision(), Decision::Admitted);
}

#[tokio::test]
async fn a_retried_request_is_counted_once_and_a_refund_gives_back_once() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, free_plan("one-unit", 1)).await;
    let mut client = usage.client().await;

    let first = client
        .admit(subscriber.admit("a"))
        .await
        .expect("admit")
        .into_inner();
    let retry = client
        .admit(subscriber.admit("a"))
        .await
        .expect("admit")
        .into_inner();
    let used_after_retry = usage_figures(&mut client, &subscriber).await.units_used;
    let refund_request = RefundRequest {
        request_id: "a".into(),
        customer_id: subscriber.customer_id.clone(),
        ..Default::default()
    };
    let first_refund = client
        .refund(refund_request.clone())
        .await
        .expect("refund")
        .into_inner();
    let second_refund = client
        .refund(refund_request)
        .await
        .expect("refund")
        .into_inner();
    let used_after_refund = usage_figures(&mut client, &subscriber).await.units_used;
    let readmitted = client
        .admit(subscriber.admit("b"))
        .await
        .expect("admit")
        .into_inner();
    let beyond = client
        .admit(subscriber.admit("c"))
        .await
        .expect("admit")
        .into_inner();

    assert_eq!(first.decision(), Decision::Admitted);
    assert!(!first.replayed);
    assert_eq!(retry.decision(), Decision::Admitted);
    assert!(retry.replayed);
    assert_eq!(retry.quota_used, first.quota_used);
    assert_eq!(used_after_retry, 1);
    assert!(first_refund.refunded);
    assert_eq!(first_refund.units, 1);
    assert!(!second_refund.refunded);
    assert_eq!(used_after_refund, 0);
    assert_eq!(readmitted.decision(), Decision::Admitted);
    assert_eq!(beyond.decision(), Decision::QuotaExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_loading_one_cold_balance_at_once_load_it_once() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let first = spawn_usage_with_prefix(&billing, &prefix).await;
    let second = spawn_usage_with_prefix(&billing, &prefix).await;
    let subscriber = subscribe(&billing, credits_plan("cold", 0, 1_000)).await;
    grant(&billing, &subscriber, 10 * 1_000).await;
    let clients = vec![first.client().await, second.client().await];
    let requests = (0..40)
        .map(|index| subscriber.admit(&format!("cold-{index}")))
        .collect();
    let stray = Uuid::new_v4();
    let mut loads = JoinSet::new();
    for _ in 0..50 {
        let counters = first.counters.clone();
        loads.spawn(async move { counters.load_credits(stray, 7_000, 1).await.expect("load") });
    }

    let (decisions, _) = admit_concurrently(&clients, requests).await;
    let mut loaded = Vec::new();
    while let Some(balance) = loads.join_next().await {
        loaded.push(balance.expect("task"));
    }

    assert_eq!(decisions.get(&Decision::Admitted), Some(&10));
    assert_eq!(decisions.get(&Decision::CreditsExhausted), Some(&30));
    assert!(loaded.iter().all(|&balance| balance == 7_000));
    let (_, stray_balance) = first
        .counters
        .grant(stray, "probe", 1, 0)
        .await
        .expect("grant");
    assert_eq!(stray_balance, 7_001);
}

#[tokio::test]
async fn a_wrong_typed_key_fails_the_script_without_changing_any_other_key() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let plan = billing_pb::CreatePlanRequest {
        rate_limit: 10,
        rate_period_ms: 1_000,
        burst: 5,
        ..free_plan("corrupted", 10)
    };
    let subscriber = subscribe(&billing, plan).await;
    let keys = usage.counters.keys().clone();
    let mut redis = redis_connection().await;
    let quota_key = keys.quota(
        subscriber.customer(),
        subscriber.subscription(),
        subscriber.period_start_ms(),
    );
    let _: () = redis::cmd("HSET")
        .arg(&quota_key)
        .arg("not")
        .arg("a counter")
        .query_async(&mut redis)
        .await
        .expect("hset");
    let mut client = usage.client().await;

    let status = client
        .admit(subscriber.admit("x"))
        .await
        .expect_err("the script must fail");

    assert_eq!(status.code(), Code::Internal);
    // The customer's keys only: the feed cursor is written by another task at its own pace.
    let pattern = format!("{}:{{c:*", usage.prefix);
    let mut present: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut redis)
        .await
        .expect("keys");
    present.sort();
    assert_eq!(present, vec![quota_key.clone()]);
    let contents: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&quota_key)
        .query_async(&mut redis)
        .await
        .expect("hgetall");
    assert_eq!(
        contents,
        HashMap::from([("not".to_owned(), "a counter".to_owned())])
    );
}

/// CRC16/XMODEM of the hash tag, as Redis Cluster assigns slots.
fn cluster_slot(key: &str) -> u16 {
    let hashed = match key.find('{') {
        Some(open) => match key[open + 1..].find('}') {
            Some(length) if length > 0 => &key[open + 1..open + 1 + length],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for byte in hashed.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

#[tokio::test]
async fn every_key_the_scripts_touch_for_one_customer_is_in_one_cluster_slot() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let plan = billing_pb::CreatePlanRequest {
        rate_limit: 100,
        rate_period_ms: 1_000,
        burst: 10,
        ..credits_plan("slots", 1, 1_000)
    };
    let subscriber = subscribe(&billing, plan).await;
    grant(&billing, &subscriber, 5_000).await;
    let mut client = usage.client().await;
    for index in 0..3 {
        client
            .admit(subscriber.admit(&format!("s-{index}")))
            .await
            .expect("admit");
    }
    client
        .refund(RefundRequest {
            request_id: "s-2".into(),
            customer_id: subscriber.customer_id.clone(),
            ..Default::default()
        })
        .await
        .expect("refund");
    usage
        .counters
        .grant(subscriber.customer(), "extra", 10, 0)
        .await
        .expect("grant");
    usage
        .counters
        .seal(subscriber.customer())
        .await
        .expect("seal");
    let mut redis = redis_connection().await;

    let everything: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", usage.prefix))
        .query_async(&mut redis)
        .await
        .expect("keys");
    let (present, deployment_wide): (Vec<String>, Vec<String>) =
        everything.into_iter().partition(|key| key.contains("{c:"));

    assert!(
        present.len() >= 7,
        "expected rate, quota, credits, grants, requests and outbox keys: {present:?}"
    );
    assert_eq!(
        cluster_slot("123456789"),
        0x31C3,
        "the CRC16 used here is Redis Cluster's"
    );
    let slot = cluster_slot(&present[0]);
    assert!(
        present.iter().all(|key| cluster_slot(key) == slot),
        "keys span slots: {present:?}"
    );
    assert_eq!(
        slot,
        cluster_slot(&format!("{{c:{}}}", subscriber.customer_id))
    );
    // The only other key is the feed cursor (once stored), which no script touches.
    let feed_cursor = format!("{}:feed_cursor", usage.prefix);
    assert!(
        deployment_wide.iter().all(|key| *key == feed_cursor),
        "{deployment_wide:?}"
    );
}

#[tokio::test]
async fn spending_reaches_billing_exactly_once_even_when_a_report_is_sent_again() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let usage = spawn_usage_with(&billing, &prefix, Duration::from_secs(3_600)).await;
    let subscriber = subscribe(&billing, credits_plan("metered", 0, 1_000)).await;
    grant(&billing, &subscriber, 5_000).await;
    let mut client = usage.client().await;
    for index in 0..3 {
        let answer = client
            .admit(subscriber.admit(&format!("e-{index}")))
            .await
            .expect("admit")
            .into_inner();
        assert_eq!(answer.decision(), Decision::Admitted);
    }
    // Seal and deliver the outbox as usage would, twice, as if billing's first answer were lost.
    let sealed = usage
        .counters
        .seal(subscriber.customer())
        .await
        .expect("seal")
        .expect("spending");
    let entries: Vec<UsageEntry> = sealed
        .spend
        .iter()
        .map(|spend| UsageEntry {
            entry_id: format!(
                "{}:{}:{}",
                sealed.id, spend.subscription, spend.period_start_ms
            ),
            customer_id: subscriber.customer_id.clone(),
            subscription_id: spend.subscription.to_string(),
            period_start: Some(subscriber.period_start),
            units: spend.units,
            credits_micros: spend.credits_micros,
            outbox_sequence: sealed.sequence,
        })
        .collect();
    let mut entitlements = billing.entitlements().await;
    let report = |report_id: &str| ReportUsageRequest {
        report_id: report_id.into(),
        entries: entries.clone(),
    };

    let first = entitlements
        .report_usage(report("first"))
        .await
        .expect("report")
        .into_inner();
    let resent = entitlements
        .report_usage(report("first"))
        .await
        .expect("report")
        .into_inner();
    let regrouped = entitlements
        .report_usage(report("second"))
        .await
        .expect("report")
        .into_inner();
    usage.shutdown().await; // sends the still-sealed outbox once more, then acknowledges it

    assert_eq!((first.duplicate, first.applied_entries), (false, 1));
    assert!(resent.duplicate);
    assert_eq!((regrouped.duplicate, regrouped.applied_entries), (false, 0));
    assert_eq!(billing_balance(&billing, &subscriber).await, 2_000);
    let periods = billing
        .admin()
        .await
        .get_customer_usage(GetCustomerUsageRequest {
            customer_id: subscriber.customer_id.clone(),
            max_periods: 0,
        })
        .await
        .expect("usage")
        .into_inner()
        .periods;
    assert_eq!(periods.len(), 1);
    assert_eq!((periods[0].units, periods[0].credits_micros), (3, 3_000));
    let leftovers = counters(&prefix)
        .await
        .customers_with_outboxes()
        .await
        .expect("scan");
    assert!(leftovers.is_empty(), "outboxes left behind: {leftovers:?}");
}

#[tokio::test]
async fn a_graceful_shutdown_reports_pending_spending_and_a_refund_reaches_billing_as_a_refund() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let usage = spawn_usage_with(&billing, &prefix, Duration::from_secs(3_600)).await;
    let subscriber = subscribe(&billing, credits_plan("flushed", 0, 250)).await;
    grant(&billing, &subscriber, 10_000).await;
    let mut client = usage.client().await;
    for index in 0..4 {
        client
            .admit(subscriber.admit(&format!("g-{index}")))
            .await
            .expect("admit");
    }
    client
        .refund(RefundRequest {
            request_id: "g-0".into(),
            customer_id: subscriber.customer_id.clone(),
            ..Default::default()
        })
        .await
        .expect("refund");
    let before_shutdown = billing_balance(&billing, &subscriber).await;

    usage.shutdown().await;

    assert_eq!(before_shutdown, 10_000);
    assert_eq!(
        billing_balance(&billing, &subscriber).await,
        10_000 - 3 * 250
    );
    let leftovers = counters(&prefix)
        .await
        .customers_with_outboxes()
        .await
        .expect("scan");
    assert!(leftovers.is_empty(), "outboxes left behind: {leftovers:?}");
}

#[tokio::test]
async fn a_new_period_counts_from_zero_and_leaves_the_old_period_alone() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, free_plan("monthly", 3)).await;
    let mut client = usage.client().await;
    for index in 0..3 {
        client
            .admit(subscriber.admit(&format!("old-{index}")))
            .await
            .expect("admit");
    }
    let next_period = Subscriber {
        period_start: subscriber.period_end,
        period_end: Timestamp {
            seconds: subscriber.period_end.seconds + 30 * 86_400,
            nanos: subscriber.period_end.nanos,
        },
        ..subscriber.clone()
    };

    let exhausted = client
        .admit(subscriber.admit("old-3"))
        .await
        .expect("admit")
        .into_inner();
    let fresh = client
        .admit(next_period.admit("new-0"))
        .await
        .expect("admit")
        .into_inner();

    assert_eq!(exhausted.decision(), Decision::QuotaExhausted);
    assert_eq!(fresh.decision(), Decision::Admitted);
    assert_eq!(fresh.quota_used, 1);
    assert_eq!(usage_figures(&mut client, &subscriber).await.units_used, 3);
    assert_eq!(usage_figures(&mut client, &next_period).await.units_used, 1);
}

#[tokio::test]
async fn usage_refuses_calls_without_the_service_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, free_plan("guarded", 3)).await;

    let missing = usage
        .client_with_token(None)
        .await
        .admit(subscriber.admit("n"))
        .await
        .expect_err("no token");
    let wrong = usage
        .client_with_token(Some(integration_tests::ADMIN_TOKEN))
        .await
        .admit(subscriber.admit("w"))
        .await
        .expect_err("admin token");

    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(wrong.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn malformed_admissions_are_invalid_and_take_nothing() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, free_plan("strict", 3)).await;
    let mut client = usage.client().await;

    let no_id = client
        .admit(subscriber.admit(""))
        .await
        .expect_err("empty id");
    let zero_units = client
        .admit(AdmitRequest {
            units: 0,
            ..subscriber.admit("z")
        })
        .await
        .expect_err("zero units");
    let bad_customer = client
        .admit(AdmitRequest {
            customer_id: "not-a-uuid".into(),
            ..subscriber.admit("b")
        })
        .await
        .expect_err("bad customer");

    assert_eq!(no_id.code(), Code::InvalidArgument);
    assert_eq!(zero_units.code(), Code::InvalidArgument);
    assert_eq!(bad_customer.code(), Code::InvalidArgument);
    assert_eq!(usage_figures(&mut client, &subscriber).await.units_used, 0);
}

#[tokio::test]
async fn usage_refuses_a_redis_that_can_lose_counters_unless_told_it_is_for_development() {
    let volatile = start_extra_redis(&["--appendonly", "no"]).await;
    let evicting =
        start_extra_redis(&["--appendonly", "yes", "--maxmemory-policy", "allkeys-lru"]).await;
    let counters_on = |url: String| async move {
        let connection = usage::connect_redis(&url).await.expect("connect");
        usage::Counters::new(connection, usage::Keys::new(unique_prefix()))
            .await
            .expect("scripts")
    };
    let without_aof = counters_on(volatile.url.clone()).await;
    let with_eviction = counters_on(evicting.url.clone()).await;
    let durable = counters_on(integration_tests::redis_url().await).await;

    let refused = usage::check_durability(&without_aof, false)
        .await
        .expect_err("no AOF");
    let evictions = usage::check_durability(&with_eviction, false)
        .await
        .expect_err("eviction");

    assert!(
        refused.to_string().contains("appendonly is off"),
        "{refused:#}"
    );
    assert!(
        evictions.to_string().contains("allkeys-lru"),
        "{evictions:#}"
    );
    assert!(usage::check_durability(&without_aof, true).await.is_ok());
    assert!(usage::check_durability(&durable, false).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_decides_each_request_of_many_customers_exactly() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let mut subscribers = Vec::new();
    for index in 0..3 {
        subscribers.push(subscribe(&billing, free_plan(&format!("batch-{index}"), 50)).await);
    }
    let requests: Vec<AdmitRequest> = (0..300)
        .map(|index| subscribers[index % 3].admit(&format!("batch-req-{index}")))
        .collect();
    let mut client = usage.client().await;

    let mut tasks = JoinSet::new();
    for chunk in requests.chunks(100) {
        let mut client = client.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            let answers = client
                .admit_batch(AdmitBatchRequest {
                    requests: chunk.clone(),
                })
                .await
                .expect("batch")
                .into_inner()
                .decisions;
            chunk.into_iter().zip(answers).collect::<Vec<_>>()
        });
    }
    let mut admitted_per_customer: HashMap<String, usize> = HashMap::new();
    let mut refused = 0;
    while let Some(pairs) = tasks.join_next().await {
        for (request, answer) in pairs.expect("task") {
            assert!(answer.error.is_empty(), "{}", answer.error);
            match answer.decision() {
                Decision::Admitted => {
                    *admitted_per_customer
                        .entry(request.customer_id)
                        .or_default() += 1
                }
                Decision::QuotaExhausted => refused += 1,
                other => panic!("unexpected decision {other:?}"),
            }
        }
    }

    assert_eq!(refused, 150);
    for subscriber in &subscribers {
        assert_eq!(
            admitted_per_customer.get(&subscriber.customer_id),
            Some(&50)
        );
        assert_eq!(usage_figures(&mut client, subscriber).await.units_used, 50);
    }
}

#[tokio::test]
async fn a_wrong_typed_key_in_a_batch_fails_only_its_own_request() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let subscriber = subscribe(&billing, free_plan("batch-corrupted", 10)).await;
    let mut redis = redis_connection().await;
    let corrupted = usage
        .counters
        .keys()
        .request(subscriber.customer(), "corrupted");
    let _: () = redis::cmd("HSET")
        .arg(&corrupted)
        .arg("not")
        .arg("a record")
        .query_async(&mut redis)
        .await
        .expect("hset");
    let mut client = usage.client().await;

    let answers = client
        .admit_batch(AdmitBatchRequest {
            requests: vec![
                subscriber.admit("first"),
                subscriber.admit("corrupted"),
                subscriber.admit("third"),
            ],
        })
        .await
        .expect("batch")
        .into_inner()
        .decisions;

    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0].decision(), Decision::Admitted);
    assert_eq!(answers[0].quota_used, 1);
    assert!(!answers[1].error.is_empty());
    assert_eq!(answers[2].decision(), Decision::Admitted);
    assert_eq!(answers[2].quota_used, 2);
    assert_eq!(usage_figures(&mut client, &subscriber).await.units_used, 2);
}
