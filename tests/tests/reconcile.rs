//! Credit mirror reconciliation: usage's Redis mirror of each balance against billing's ledger, with real
//! Redis, billing (real PostgreSQL) and usage.

use std::time::Duration;

use integration_tests::{
    BillingInstance, SERVICE_TOKEN, UsageClient, UsageInstance, customer_request, fresh_database,
    plan_request, redis_connection, spawn_billing, spawn_usage,
};
use prost_types::Timestamp;
use proto::{
    billing::v1::{
        self as billing_pb, CreateSubscriptionRequest, GetCreditBalanceRequest,
        GrantCreditsRequest, Limits, OverageMode, ReportUsageRequest, UsageEntry,
    },
    usage::v1::{AdmitRequest, Decision, GetUsageRequest},
};
use tokio::task::JoinSet;
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
