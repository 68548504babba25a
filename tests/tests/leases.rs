//! Leases (docs/leases.md) against real Redis, the real usage service in-process and, where spending must
//! reach billing, the real billing service; a raw `UsageClient` plays the holder (a gateway process).

use std::time::{Duration, Instant};

use integration_tests::{
    BillingInstance, UsageClient, customer_request, fresh_database, plan_request, redis_url,
    spawn_billing, spawn_usage_with_leases, unique_prefix,
};
use prost_types::Timestamp;
use proto::{
    billing::v1::{
        self as billing_pb, CreateSubscriptionRequest, GetCreditBalanceRequest,
        GetCustomerUsageRequest, GrantCreditsRequest, Limits, OverageMode,
    },
    usage::v1::{
        AdmitBatchRequest, AdmitRequest, Decision, GetUsageRequest, LeaseAsk, LeaseGrant,
        LeaseOutcome, LeaseRequest, LeaseReturn, LeaseReturned, RefundRequest, ReturnLeasesRequest,
        WatchRecallsRequest,
    },
};
use tokio_stream::StreamExt;
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
    fn customer(&self) -> Uuid {
        Uuid::parse_str(&self.customer_id).expect("billing ids are UUIDs")
    }

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

    fn ask(&self, lease_id: Uuid, units_wanted: i64, min_units: i64) -> LeaseAsk {
        LeaseAsk {
            lease_id: lease_id.to_string(),
            customer_id: self.customer_id.clone(),
            subscription_id: self.subscription_id.clone(),
            limits: Some(self.limits),
            period_start: Some(self.period_start),
            period_end: Some(self.period_end),
            units_wanted,
            slots_wanted: 100,
            min_units,
        }
    }

    fn giving_back(&self, lease_id: Uuid, units_spent: i64, first_unused_slot: u32) -> LeaseReturn {
        LeaseReturn {
            lease_id: lease_id.to_string(),
            customer_id: self.customer_id.clone(),
            units_spent,
            first_unused_slot,
        }
    }
}

/// A gateway process as usage sees it: a holder id and a client.
struct Holder {
    id: Uuid,
    client: UsageClient,
}

impl Holder {
    async fn of(usage: &integration_tests::UsageInstance) -> Self {
        Self {
            id: Uuid::new_v4(),
            client: usage.client().await,
        }
    }

    async fn lease(&mut self, ask: LeaseAsk) -> LeaseGrant {
        let grants = self
            .client
            .lease(LeaseRequest {
                holder_id: self.id.to_string(),
                asks: vec![ask],
            })
            .await
            .expect("lease")
            .into_inner()
            .grants;
        assert_eq!(grants.len(), 1);
        let grant = grants.into_iter().next().expect("one grant");
        assert_eq!(grant.error, "");
        grant
    }

    async fn give_back(&mut self, lease: LeaseReturn) -> LeaseReturned {
        let results = self
            .client
            .return_leases(ReturnLeasesRequest {
                holder_id: self.id.to_string(),
                returns: vec![lease],
            })
            .await
            .expect("return")
            .into_inner()
            .results;
        results.into_iter().next().expect("one result")
    }

    async fn watch(&mut self) -> tonic::Streaming<proto::usage::v1::Recall> {
        self.client
            .watch_recalls(WatchRecallsRequest {
                holder_id: self.id.to_string(),
            })
            .await
            .expect("watch")
            .into_inner()
    }
}

fn quick_leases() -> usage::LeaseSettings {
    usage::LeaseSettings {
        ttl: Duration::from_millis(300),
        grace: Duration::from_millis(100),
        recall_wait: Duration::from_millis(100),
    }
}

/// Default leases, with a recall wait long enough for a test holder on a loaded machine to answer.
fn patient_recalls() -> usage::LeaseSettings {
    usage::LeaseSettings {
        recall_wait: Duration::from_secs(5),
        ..usage::LeaseSettings::default()
    }
}

fn block_plan(included_units: i64) -> billing_pb::CreatePlanRequest {
    billing_pb::CreatePlanRequest {
        price_micros: 0,
        included_units,
        ..plan_request(&format!("p{}", Uuid::new_v4().simple()))
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
    // Billing's test clock stands at its fixed start while Redis runs on this machine's clock, and a lease
    // never outlives its period: the period is made to end a day from now (usage counts and bills by
    // subscription and period start, so nothing else changes).
    let a_day_from_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
        + 86_400;
    Subscriber {
        customer_id: customer.id,
        subscription_id: entitlement.subscription_id,
        limits: entitlement.limits.expect("limits"),
        period_start: entitlement.period_start.expect("period start"),
        period_end: Timestamp {
            seconds: i64::try_from(a_day_from_now).expect("a sane clock"),
            nanos: 0,
        },
    }
}

async fn units_used(client: &mut UsageClient, subscriber: &Subscriber) -> i64 {
    client
        .get_usage(GetUsageRequest {
            customer_id: subscriber.customer_id.clone(),
            subscription_id: subscriber.subscription_id.clone(),
            period_start: Some(subscriber.period_start),
        })
        .await
        .expect("usage")
        .into_inner()
        .units_used
}

/// Units and credits billing recorded for the customer's periods.
async fn billed(billing: &BillingInstance, subscriber: &Subscriber) -> (i64, i64) {
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
    periods.iter().fold((0, 0), |(units, credits), period| {
        (units + period.units, credits + period.credits_micros)
    })
}

async fn admit_many(
    client: &mut UsageClient,
    subscriber: &Subscriber,
    ids: &str,
    count: usize,
) -> Vec<Decision> {
    client
        .admit_batch(AdmitBatchRequest {
            requests: (0..count)
                .map(|index| subscriber.admit(&format!("{ids}-{index}")))
                .collect(),
        })
        .await
        .expect("batch")
        .into_inner()
        .decisions
        .iter()
        .map(|decision| decision.decision())
        .collect()
}

fn written_off_total() -> f64 {
    let text = telemetry::metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix("paygate_usage_leases_written_off_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Returns the next recall on `recalls`, failing the test after 10 s.
async fn next_recall(
    recalls: &mut tonic::Streaming<proto::usage::v1::Recall>,
) -> proto::usage::v1::Recall {
    tokio::time::timeout(Duration::from_secs(10), recalls.message())
        .await
        .expect("a recall within 10 s")
        .expect("the stream")
        .expect("a recall")
}

/// Waits for usage to announce a return or write-off of one of `customer`'s leases.
async fn returned_announcement(prefix: &str) -> impl std::future::Future<Output = String> {
    let client = redis::Client::open(redis_url().await).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(format!("{prefix}:returned"))
        .await
        .expect("subscribe");
    async move {
        let mut messages = pubsub.into_on_message();
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("an announcement within 10 s")
            .expect("a message");
        message.get_payload().expect("a text payload")
    }
}

#[tokio::test]
async fn a_grant_takes_at_most_half_the_free_units_and_nothing_below_min_units() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut first = Holder::of(&usage).await;
    let mut second = Holder::of(&usage).await;

    let half = first.lease(subscriber.ask(Uuid::new_v4(), 1_000, 1)).await;
    let quarter = second.lease(subscriber.ask(Uuid::new_v4(), 1_000, 1)).await;
    let too_small = second
        .lease(subscriber.ask(Uuid::new_v4(), 1_000, 13))
        .await;
    let modest = first.lease(subscriber.ask(Uuid::new_v4(), 5, 1)).await;

    assert_eq!((half.quota_units, half.credit_units), (50, 0));
    assert_eq!((half.quota_used, half.quota_limit), (50, 100));
    assert_eq!(quarter.quota_units, 25);
    assert_eq!((too_small.quota_units, too_small.credit_units), (0, 0));
    assert_eq!(modest.quota_units, 5);
    assert_eq!(half.slots, 0, "a plan without a rate limit needs no slots");
    assert_eq!(half.emission_us, 0);
    assert!(half.ttl_ms > 0 && half.ttl_ms <= 2_000);
    assert_eq!(units_used(&mut first.client, &subscriber).await, 80);
}

#[tokio::test]
async fn a_grant_is_idempotent_by_lease_id() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&usage).await;
    let lease_id = Uuid::new_v4();

    let first = holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;
    let retried = holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;

    assert_eq!(first.quota_units, 50);
    assert!(!first.replayed);
    assert!(retried.replayed);
    assert_eq!(
        LeaseGrant {
            replayed: false,
            ..retried
        },
        first
    );
    assert_eq!(units_used(&mut holder.client, &subscriber).await, 50);
}

#[tokio::test]
async fn returning_a_partly_spent_lease_gives_back_the_unspent_units_and_bills_the_spent_part_once()
{
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&usage).await;
    let lease_id = Uuid::new_v4();
    holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;

    let returned = holder
        .give_back(subscriber.giving_back(lease_id, 20, 0))
        .await;
    let again = holder
        .give_back(subscriber.giving_back(lease_id, 20, 0))
        .await;
    let used = units_used(&mut holder.client, &subscriber).await;
    usage.shutdown().await;

    assert_eq!(returned.outcome(), LeaseOutcome::Returned);
    assert_eq!(returned.units_given_back, 30);
    assert_eq!(again.outcome(), LeaseOutcome::AlreadyReturned);
    assert_eq!(again.units_given_back, 30);
    assert_eq!(used, 20);
    assert_eq!(billed(&billing, &subscriber).await, (20, 0));
}

#[tokio::test]
async fn a_lease_never_returned_is_written_off_after_deadline_and_grace_and_never_billed() {
    telemetry::metrics();
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let usage = spawn_usage_with_leases(&billing, &prefix, quick_leases()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&usage).await;
    let lease_id = Uuid::new_v4();
    let announced = returned_announcement(&prefix).await;
    holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;

    let customer = announced.await;
    let late_return = holder
        .give_back(subscriber.giving_back(lease_id, 10, 0))
        .await;
    let decisions = admit_many(&mut holder.client, &subscriber, "after", 51).await;
    let used = units_used(&mut holder.client, &subscriber).await;
    let written_off = written_off_total();
    usage.shutdown().await;

    assert_eq!(customer, subscriber.customer_id);
    assert_eq!(late_return.outcome(), LeaseOutcome::WrittenOff);
    assert_eq!(late_return.units_given_back, 0);
    assert!(
        decisions[..50]
            .iter()
            .all(|decision| *decision == Decision::Admitted)
    );
    assert_eq!(decisions[50], Decision::QuotaExhausted);
    assert_eq!(used, 100);
    assert_eq!(written_off, 1.0);
    assert_eq!(billed(&billing, &subscriber).await, (50, 0));
}

#[tokio::test]
async fn a_recalled_lease_is_returned_and_the_waiting_admission_is_admitted() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage_with_leases(&billing, &unique_prefix(), patient_recalls()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&usage).await;
    let mut recalls = holder.watch().await;
    let lease_id = Uuid::new_v4();
    holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;
    let mut admitter = usage.client().await;
    let free = admit_many(&mut admitter, &subscriber, "free", 50).await;

    let admission = tokio::spawn({
        let request = subscriber.admit("needs-the-lease");
        async move { admitter.admit(request).await.expect("admit").into_inner() }
    });
    let recall = next_recall(&mut recalls).await;
    let returned = holder
        .give_back(subscriber.giving_back(lease_id, 0, 0))
        .await;
    let decided = admission.await.expect("task");

    assert!(free.iter().all(|decision| *decision == Decision::Admitted));
    assert_eq!(recall.customer_id, subscriber.customer_id);
    assert_eq!(returned.outcome(), LeaseOutcome::Returned);
    assert_eq!(decided.decision(), Decision::Admitted);
    assert_eq!(decided.quota_used, 51);
}

#[tokio::test]
async fn a_holder_that_never_returns_leaves_the_admission_refused_within_the_bounded_wait() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&usage).await;
    let mut recalls = holder.watch().await;
    holder.lease(subscriber.ask(Uuid::new_v4(), 1_000, 1)).await;
    let mut admitter = usage.client().await;
    admit_many(&mut admitter, &subscriber, "free", 50).await;

    let started = Instant::now();
    let decided = admitter
        .admit(subscriber.admit("refused"))
        .await
        .expect("admit")
        .into_inner();
    let waited = started.elapsed();
    let recall = next_recall(&mut recalls).await;

    assert_eq!(decided.decision(), Decision::QuotaExhausted);
    assert!(waited >= Duration::from_millis(100), "waited {waited:?}");
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    assert_eq!(recall.customer_id, subscriber.customer_id);
}

#[tokio::test]
async fn a_recall_crosses_usage_replicas_sharing_one_redis() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let watched = spawn_usage_with_leases(&billing, &prefix, patient_recalls()).await;
    let other = spawn_usage_with_leases(&billing, &prefix, patient_recalls()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&watched).await;
    let mut recalls = holder.watch().await;
    let lease_id = Uuid::new_v4();
    holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;
    let mut admitter = other.client().await;
    admit_many(&mut admitter, &subscriber, "free", 50).await;

    let admission = tokio::spawn({
        let request = subscriber.admit("on-the-other-replica");
        async move { admitter.admit(request).await.expect("admit").into_inner() }
    });
    let recall = next_recall(&mut recalls).await;
    let returned = holder
        .give_back(subscriber.giving_back(lease_id, 0, 0))
        .await;
    let decided = admission.await.expect("task");

    assert_eq!(recall.customer_id, subscriber.customer_id);
    assert_eq!(returned.outcome(), LeaseOutcome::Returned);
    assert_eq!(decided.decision(), Decision::Admitted);
}

#[tokio::test]
async fn a_credits_lease_holds_credits_at_the_unit_price_and_bills_only_what_was_spent() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(
        &billing,
        billing_pb::CreatePlanRequest {
            overage_mode: OverageMode::Credits.into(),
            unit_price_micros: 250,
            ..block_plan(0)
        },
    )
    .await;
    billing
        .admin()
        .await
        .grant_credits(GrantCreditsRequest {
            customer_id: subscriber.customer_id.clone(),
            amount_micros: 10_000,
            reference: Uuid::new_v4().to_string(),
            note: String::new(),
        })
        .await
        .expect("grant");
    let mut holder = Holder::of(&usage).await;
    let loaded = holder
        .client
        .admit(subscriber.admit("loads-the-credits"))
        .await
        .expect("admit")
        .into_inner();
    let lease_id = Uuid::new_v4();

    let grant = holder.lease(subscriber.ask(lease_id, 100, 1)).await;
    let returned = holder
        .give_back(subscriber.giving_back(lease_id, 4, 0))
        .await;
    usage.shutdown().await;

    assert_eq!(loaded.credits_remaining_micros, 9_750);
    assert_eq!((grant.quota_units, grant.credit_units), (0, 19));
    assert_eq!(grant.unit_price_micros, 250);
    assert_eq!(grant.credits_remaining_micros, 9_750 - 19 * 250);
    assert_eq!(returned.units_given_back, 15);
    assert_eq!(billed(&billing, &subscriber).await, (5, 5 * 250));
    let balance = billing
        .admin()
        .await
        .get_credit_balance(GetCreditBalanceRequest {
            customer_id: subscriber.customer_id.clone(),
        })
        .await
        .expect("balance")
        .into_inner()
        .balance_micros;
    assert_eq!(balance, 10_000 - 5 * 250);
}

#[tokio::test]
async fn a_slots_grant_takes_half_the_burst_and_a_return_moves_the_rate_back_only_from_the_tail() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let usage = spawn_usage_with_leases(&billing, &prefix, usage::LeaseSettings::default()).await;
    let subscriber = subscribe(
        &billing,
        billing_pb::CreatePlanRequest {
            rate_limit: 10,
            rate_period_ms: 1_000,
            burst: 10,
            ..block_plan(1_000)
        },
    )
    .await;
    let mut holder = Holder::of(&usage).await;
    let mut redis = integration_tests::redis_connection().await;
    let rate_key = format!("{prefix}:{{c:{}}}:rate", subscriber.customer());
    let rate = async |redis: &mut redis::aio::ConnectionManager| -> i64 {
        redis::cmd("GET")
            .arg(&rate_key)
            .query_async(redis)
            .await
            .expect("rate key")
    };
    let (tail, stacked) = (Uuid::new_v4(), Uuid::new_v4());

    let grant = holder.lease(subscriber.ask(tail, 1_000, 1)).await;
    let end_of_grant = rate(&mut redis).await;
    let returned = holder.give_back(subscriber.giving_back(tail, 1, 3)).await;
    let after_return = rate(&mut redis).await;
    let second = holder.lease(subscriber.ask(stacked, 1_000, 1)).await;
    let admitted = holder
        .client
        .admit(subscriber.admit("after-the-lease"))
        .await
        .expect("admit")
        .into_inner();
    let before_stacked_return = rate(&mut redis).await;
    holder
        .give_back(subscriber.giving_back(stacked, 0, 0))
        .await;
    let after_stacked_return = rate(&mut redis).await;

    assert_eq!(grant.emission_us, 100_000);
    assert_eq!(grant.tolerance_us, 1_000_000);
    assert_eq!(
        grant.first_slot_offset_us, 2_000,
        "a fresh limiter: slots start after the lead"
    );
    assert_eq!(grant.slots, 4, "half of the 9 whole slots usable now");
    assert_eq!(grant.quota_units, 500);
    assert_eq!(returned.outcome(), LeaseOutcome::Returned);
    assert_eq!(after_return, end_of_grant - 100_000, "slot 3 came back");
    assert!(second.slots > 0);
    assert_eq!(admitted.decision(), Decision::Admitted);
    assert_eq!(
        after_stacked_return, before_stacked_return,
        "slots under a later admission stay taken"
    );
}

#[tokio::test]
async fn a_late_refund_against_a_returned_lease_applies_once() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let mut holder = Holder::of(&usage).await;
    let lease_id = Uuid::new_v4();
    holder.lease(subscriber.ask(lease_id, 1_000, 1)).await;
    holder
        .give_back(subscriber.giving_back(lease_id, 10, 0))
        .await;
    let refund = RefundRequest {
        request_id: "failed-upstream".into(),
        customer_id: subscriber.customer_id.clone(),
        lease_id: lease_id.to_string(),
        units: 3,
    };

    let first = holder
        .client
        .refund(refund.clone())
        .await
        .expect("refund")
        .into_inner();
    let again = holder
        .client
        .refund(refund)
        .await
        .expect("refund")
        .into_inner();
    let used = units_used(&mut holder.client, &subscriber).await;
    usage.shutdown().await;

    assert!(first.refunded);
    assert_eq!((first.units, first.credits_micros), (3, 0));
    assert!(!again.refunded);
    assert_eq!(used, 7);
    assert_eq!(billed(&billing, &subscriber).await, (7, 0));
}

#[tokio::test]
async fn credits_written_off_with_a_lease_are_not_poured_back_by_reconciliation() {
    let billing = spawn_billing(fresh_database().await).await;
    let prefix = unique_prefix();
    let usage = spawn_usage_with_leases(&billing, &prefix, quick_leases()).await;
    let subscriber = subscribe(
        &billing,
        billing_pb::CreatePlanRequest {
            overage_mode: OverageMode::Credits.into(),
            unit_price_micros: 250,
            ..block_plan(0)
        },
    )
    .await;
    billing
        .admin()
        .await
        .grant_credits(GrantCreditsRequest {
            customer_id: subscriber.customer_id.clone(),
            amount_micros: 10_000,
            reference: Uuid::new_v4().to_string(),
            note: String::new(),
        })
        .await
        .expect("grant");
    let mut holder = Holder::of(&usage).await;
    holder
        .client
        .admit(subscriber.admit("loads-the-credits"))
        .await
        .expect("admit");
    let announced = returned_announcement(&prefix).await;
    let grant = holder.lease(subscriber.ask(Uuid::new_v4(), 100, 1)).await;
    announced.await;
    usage.shutdown().await; // reports the one admission, so billing's ledger is settled

    let counters = integration_tests::counters(&prefix).await;
    let state = counters
        .mirror_state(subscriber.customer())
        .await
        .expect("mirror")
        .expect("loaded");
    let snapshot = billing
        .entitlements()
        .await
        .get_credit_balance(GetCreditBalanceRequest {
            customer_id: subscriber.customer_id.clone(),
        })
        .await
        .expect("balance")
        .into_inner();
    let reconciled = counters
        .reconcile_credits(
            subscriber.customer(),
            state.version,
            usage::counters::LedgerSnapshot {
                balance_micros: snapshot.balance_micros,
                as_of_sequence: snapshot.as_of_sequence,
                outbox_sequence: snapshot.outbox_sequence,
            },
        )
        .await
        .expect("reconcile");

    assert_eq!(grant.credit_units, 19);
    assert_eq!(
        snapshot.balance_micros,
        10_000 - 250,
        "the write-off was never billed"
    );
    assert_eq!(
        reconciled.reconciled,
        usage::counters::Reconciled::Matched {
            balance: 10_000 - 250 - 19 * 250
        }
    );
}

/// The gateway's own entitlement for `subscriber` (what its cache would hold after billing resolved it).
fn gateway_entitlement(subscriber: &Subscriber) -> gateway::entitlements::Entitlement {
    let instant = |timestamp: Timestamp| {
        time::OffsetDateTime::from_unix_timestamp(timestamp.seconds).expect("a sane instant")
    };
    gateway::entitlements::Entitlement {
        customer_id: subscriber.customer_id.clone(),
        subscription_id: subscriber.subscription_id.clone(),
        plan_code: String::new(),
        standing: gateway::entitlements::Standing::Good,
        features: Vec::new(),
        limits: gateway::entitlements::Limits {
            included_units: subscriber.limits.included_units,
            rate_limit: subscriber.limits.rate_limit,
            rate_period_ms: subscriber.limits.rate_period_ms,
            burst: subscriber.limits.burst,
            overage: gateway::entitlements::Overage::Block,
            unit_price_micros: subscriber.limits.unit_price_micros,
        },
        period_start: Some(instant(subscriber.period_start)),
        period_end: Some(instant(subscriber.period_end)),
        currency: "USD".into(),
        valid_until: None,
    }
}

#[tokio::test]
async fn a_lease_asked_through_the_gateways_client_is_spent_locally_and_billed_only_for_what_was_spent()
 {
    let billing = spawn_billing(fresh_database().await).await;
    let usage =
        spawn_usage_with_leases(&billing, &unique_prefix(), usage::LeaseSettings::default()).await;
    let subscriber = subscribe(&billing, block_plan(100)).await;
    let entitlement = gateway_entitlement(&subscriber);
    let backends = gateway::backends::Backends::new(
        gateway::backends::channel(&format!("http://{}", billing.addr)).expect("billing channel"),
        gateway::backends::channel(&format!("http://{}", usage.addr)).expect("usage channel"),
        proto::auth::BearerToken::new(integration_tests::SERVICE_TOKEN).expect("token"),
        Duration::from_secs(2),
    );
    let holder = Uuid::new_v4();
    let ask = gateway::backends::LeaseAsk {
        lease_id: Uuid::new_v4(),
        entitlement: &entitlement,
        wanted: gateway::leases::Wanted {
            units: 1_000,
            slots: 0,
            min_units: 1,
        },
    };

    let asked_at = Instant::now();
    let mut grants = backends.lease(holder, &[ask]).await.expect("usage answers");
    let grant = grants
        .pop()
        .expect("one answer")
        .expect("a usable grant")
        .expect("not empty");
    let lease = std::sync::Arc::new(gateway::leases::Lease::new(
        grant.clone(),
        asked_at,
        Instant::now(),
    ));
    let spent = (0..7)
        .filter(|_| lease.try_spend(1, Instant::now()).is_some())
        .count();
    let closing = lease.close();
    let outcomes = backends
        .return_leases(
            holder,
            &[gateway::leases::LeaseToReturn {
                lease: lease.clone(),
                closing,
            }],
        )
        .await
        .expect("usage answers");
    let mut client = usage.client().await;
    let used = units_used(&mut client, &subscriber).await;
    usage.shutdown().await;

    assert_eq!(grant.quota_units, 50, "half of the 100 free units");
    assert_eq!(spent, 7);
    assert_eq!(closing.units_spent, 7);
    assert_eq!(outcomes, vec![gateway::backends::ReturnOutcome::Returned]);
    assert_eq!(used, 7);
    assert_eq!(billed(&billing, &subscriber).await, (7, 0));
}
