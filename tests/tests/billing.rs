//! Billing's gRPC contract (`billing.v1`), exercised against the real service and a real PostgreSQL.

use std::collections::HashSet;

use integration_tests::{
    ADMIN_TOKEN, AdminClient, BillingInstance, CLOCK_START, EntitlementsClient, SERVICE_TOKEN,
    as_actor, customer_request, fresh_database, instant, key_digest, payment_request, plan_request,
    spawn_billing, spawn_billing_with_clock,
};
use proto::billing::v1::{
    AdjustCreditsRequest, ArchivePlanRequest, AuditEvent, CancelSubscriptionRequest,
    ChangeSubscriptionPlanRequest, CreateCustomerRequest, CreatePlanRequest,
    CreateSubscriptionRequest, Customer, Entitlement, GetCreditBalanceRequest, GetCustomerRequest,
    GetCustomerSubscriptionRequest, GetCustomerUsageRequest, GetSubscriptionRequest,
    GrantCreditsRequest, IssueApiKeyRequest, IssuedApiKey, LedgerEntry, LedgerEntryKind,
    ListApiKeysRequest, ListAuditEventsRequest, ListCustomersRequest, ListLedgerEntriesRequest,
    ListPlansRequest, OverageMode, Payment, PaymentOutcome, PaymentPurpose, Plan,
    RecordPaymentRequest, ReportUsageRequest, ResolveRequest, RevokeApiKeyRequest,
    RotateApiKeyRequest, Standing, Subscription, SubscriptionStatus, UsageEntry,
    WatchChangesRequest, change_event::Change,
};
use time::{Duration, OffsetDateTime, macros::datetime};
use tokio::{task::JoinSet, time::timeout};
use tonic::{Code, Response, Status};
use uuid::Uuid;

const PERIOD_1_END: OffsetDateTime = datetime!(2026-02-15 12:00:00 UTC);
const PERIOD_2_END: OffsetDateTime = datetime!(2026-03-15 12:00:00 UTC);
const GRACE: Duration = Duration::days(3);
const PRICE: i64 = 10_000_000;
/// A bound on waiting for something that should happen within milliseconds; never a synchronisation.
const FAILURE_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Awaits each call in turn and pairs its label with its outcome, the response dropped.
macro_rules! outcomes {
    ($($label:literal: $call:expr;)*) => {
        vec![$(($label, $call.await.map(drop))),*]
    };
}

// ---- authentication ----------------------------------------------------------------------------------

#[tokio::test]
async fn every_admin_rpc_refuses_a_call_without_a_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin_with_token(None).await;

    let outcomes = call_every_admin_rpc(&mut admin).await;

    assert_every_outcome_is(outcomes, Code::Unauthenticated);
}

#[tokio::test]
async fn every_admin_rpc_refuses_a_wrong_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin_with_token(Some("not-the-admin-token")).await;

    let outcomes = call_every_admin_rpc(&mut admin).await;

    assert_every_outcome_is(outcomes, Code::Unauthenticated);
}

#[tokio::test]
async fn every_admin_rpc_refuses_the_service_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin_with_token(Some(SERVICE_TOKEN)).await;

    let outcomes = call_every_admin_rpc(&mut admin).await;

    assert_every_outcome_is(outcomes, Code::Unauthenticated);
}

#[tokio::test]
async fn every_entitlements_rpc_refuses_a_call_without_a_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut entitlements = billing.entitlements_with_token(None).await;

    let outcomes = call_every_entitlements_rpc(&mut entitlements).await;

    assert_every_outcome_is(outcomes, Code::Unauthenticated);
}

#[tokio::test]
async fn every_entitlements_rpc_refuses_a_wrong_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut entitlements = billing
        .entitlements_with_token(Some("not-the-service-token"))
        .await;

    let outcomes = call_every_entitlements_rpc(&mut entitlements).await;

    assert_every_outcome_is(outcomes, Code::Unauthenticated);
}

#[tokio::test]
async fn every_entitlements_rpc_refuses_the_admin_token() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut entitlements = billing.entitlements_with_token(Some(ADMIN_TOKEN)).await;

    let outcomes = call_every_entitlements_rpc(&mut entitlements).await;

    assert_every_outcome_is(outcomes, Code::Unauthenticated);
}

// ---- malformed requests and unknown ids ---------------------------------------------------------------

#[tokio::test]
async fn malformed_admin_requests_are_invalid_argument() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    let admin = &mut world.admin;
    let customer_id = world.customer.id.as_str();
    let plan_id = world.plan.id.as_str();
    let subscription_id = world.subscription.id.as_str();
    let key_id = world.key.key.as_ref().expect("issued key").id.as_str();
    let top_up_of = |key: &str, amount| top_up(customer_id, key, amount);
    let lower_case_currency = CreateCustomerRequest {
        currency: "usd".into(),
        ..customer_request("lower-case-currency")
    };
    let credits_without_price = CreatePlanRequest {
        overage_mode: OverageMode::Credits.into(),
        unit_price_micros: 0,
        ..plan_request("credits-without-price")
    };
    let reason_on_success = RecordPaymentRequest {
        failure_reason: "declined".into(),
        ..top_up_of("evt-reason-on-success", 5)
    };
    let too_much_grace = RotateApiKeyRequest {
        key_id: key_id.into(),
        grace_seconds: 30 * 24 * 60 * 60 + 1,
    };
    let long_key_name = IssueApiKeyRequest {
        name: "n".repeat(129),
        ..issue_key_request(customer_id)
    };

    let outcomes = outcomes! {
        "CreateCustomer, empty external_id": admin.create_customer(customer_request(""));
        "CreateCustomer, 129-character external_id":
            admin.create_customer(customer_request(&"x".repeat(129)));
        "CreateCustomer, lower-case currency": admin.create_customer(lower_case_currency);
        "GetCustomer, malformed id": admin.get_customer(get_customer("not-a-uuid"));
        "ListCustomers, page_size 501": admin.list_customers(customers_page(501, ""));
        "CreatePlan, code with upper case and a space": admin.create_plan(plan_request("Not Valid"));
        "CreatePlan, negative price":
            admin.create_plan(CreatePlanRequest { price_micros: -1, ..plan_request("negative") });
        "CreatePlan, no interval":
            admin.create_plan(CreatePlanRequest { interval: 0, ..plan_request("no-interval") });
        "CreatePlan, credit overage without unit price": admin.create_plan(credits_without_price);
        "ArchivePlan, malformed id": admin.archive_plan(archive_plan("not-a-uuid"));
        "CreateSubscription, malformed customer id":
            admin.create_subscription(subscribe_request("not-a-uuid", plan_id));
        "GetSubscription, malformed id":
            admin.get_subscription(get_subscription_request("not-a-uuid"));
        "GetCustomerSubscription, malformed id":
            admin.get_customer_subscription(customer_subscription_request("not-a-uuid"));
        "ChangeSubscriptionPlan, malformed plan id":
            admin.change_subscription_plan(change_plan(subscription_id, "not-a-uuid"));
        "CancelSubscription, malformed id": admin.cancel_subscription(cancel("not-a-uuid", false));
        "RecordPayment, negative amount": admin.record_payment(top_up_of("evt-negative", -5));
        "RecordPayment, empty idempotency key": admin.record_payment(top_up_of("", 5));
        "RecordPayment, no purpose":
            admin.record_payment(RecordPaymentRequest { purpose: 0, ..top_up_of("evt-none", 5) });
        "RecordPayment, failure reason on a succeeded payment":
            admin.record_payment(reason_on_success);
        "GrantCredits, zero": admin.grant_credits(grant(customer_id, 0, "zero"));
        "GrantCredits, no reference": admin.grant_credits(grant(customer_id, 5, ""));
        "AdjustCredits, zero": admin.adjust_credits(adjust(customer_id, 0, "zero"));
        "AdjustCredits, no note":
            admin.adjust_credits(AdjustCreditsRequest { note: "".into(), ..adjust(customer_id, 5, "x") });
        "GetCreditBalance, malformed id":
            admin.get_credit_balance(balance_request("not-a-uuid"));
        "ListLedgerEntries, malformed id":
            admin.list_ledger_entries(ledger_request("not-a-uuid"));
        "IssueApiKey, malformed customer id": admin.issue_api_key(issue_key_request("not-a-uuid"));
        "IssueApiKey, 129-character name": admin.issue_api_key(long_key_name);
        "ListApiKeys, malformed id": admin.list_api_keys(keys_request("not-a-uuid"));
        "RevokeApiKey, malformed id": admin.revoke_api_key(revoke("not-a-uuid"));
        "RotateApiKey, more than 30 days of grace": admin.rotate_api_key(too_much_grace);
        "GetCustomerUsage, malformed id": admin.get_customer_usage(usage_request("not-a-uuid"));
        "ListAuditEvents, page_size 501": admin.list_audit_events(audit_page("", 501));
    };

    assert_every_outcome_is(outcomes, Code::InvalidArgument);
}

#[tokio::test]
async fn malformed_entitlements_requests_are_invalid_argument() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    let entitlements = &mut world.entitlements;
    let mut no_entry_id = usage_report("report-1", &world.subscription, 1, 1000);
    no_entry_id.entries[0].entry_id.clear();
    let mut foreign_subscription = usage_report("report-2", &world.subscription, 1, 1000);
    foreign_subscription.entries[0].subscription_id = Uuid::now_v7().to_string();
    let short_digest = ResolveRequest {
        key_digest: vec![7; 31],
    };

    let outcomes = outcomes! {
        "Resolve, 31-byte digest": entitlements.resolve(short_digest);
        "ReportUsage, no report id": entitlements.report_usage(usage_report("", &world.subscription, 1, 1000));
        "ReportUsage, entry without an id": entitlements.report_usage(no_entry_id);
        "GetCreditBalance, malformed id":
            entitlements.get_credit_balance(balance_request("not-a-uuid"));
    };

    assert_every_outcome_is(outcomes, Code::InvalidArgument);
}

#[tokio::test]
async fn unknown_ids_are_not_found_on_every_rpc_that_takes_one() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    let unsubscribed = create_customer(&mut world.admin, "unsubscribed").await;
    let admin = &mut world.admin;
    let unknown = Uuid::now_v7().to_string();
    let unknown = unknown.as_str();
    let plan_id = world.plan.id.as_str();
    let subscription_id = world.subscription.id.as_str();
    let payment = top_up(unknown, "evt-unknown-customer", 5);

    let outcomes = outcomes! {
        "GetCustomer": admin.get_customer(get_customer(unknown));
        "ArchivePlan": admin.archive_plan(archive_plan(unknown));
        "CreateSubscription, unknown customer":
            admin.create_subscription(subscribe_request(unknown, plan_id));
        "CreateSubscription, unknown plan":
            admin.create_subscription(subscribe_request(&unsubscribed.id, unknown));
        "GetSubscription": admin.get_subscription(get_subscription_request(unknown));
        "GetCustomerSubscription, unknown customer":
            admin.get_customer_subscription(customer_subscription_request(unknown));
        "GetCustomerSubscription, customer without one":
            admin.get_customer_subscription(customer_subscription_request(&unsubscribed.id));
        "ChangeSubscriptionPlan, unknown subscription":
            admin.change_subscription_plan(change_plan(unknown, plan_id));
        "ChangeSubscriptionPlan, unknown plan":
            admin.change_subscription_plan(change_plan(subscription_id, unknown));
        "CancelSubscription": admin.cancel_subscription(cancel(unknown, false));
        "RecordPayment": admin.record_payment(payment);
        "GrantCredits": admin.grant_credits(grant(unknown, 5, "unknown"));
        "AdjustCredits": admin.adjust_credits(adjust(unknown, 5, "unknown"));
        "GetCreditBalance": admin.get_credit_balance(balance_request(unknown));
        "ListLedgerEntries": admin.list_ledger_entries(ledger_request(unknown));
        "IssueApiKey": admin.issue_api_key(issue_key_request(unknown));
        "ListApiKeys": admin.list_api_keys(keys_request(unknown));
        "RevokeApiKey": admin.revoke_api_key(revoke(unknown));
        "RotateApiKey": admin.rotate_api_key(RotateApiKeyRequest { key_id: unknown.into(), grace_seconds: 0 });
        "GetCustomerUsage": admin.get_customer_usage(usage_request(unknown));
        "Entitlements.GetCreditBalance":
            world.entitlements.get_credit_balance(balance_request(unknown));
    };

    assert_every_outcome_is(outcomes, Code::NotFound);
}

// ---- customers and plans -----------------------------------------------------------------------------

#[tokio::test]
async fn a_created_customer_can_be_fetched_by_id() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;

    let created = admin
        .create_customer(CreateCustomerRequest {
            currency: String::new(),
            ..customer_request("acme")
        })
        .await
        .unwrap()
        .into_inner();
    let fetched = admin
        .get_customer(get_customer(&created.id))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(fetched, created);
    assert_eq!(fetched.external_id, "acme");
    assert_eq!(fetched.name, "Customer acme");
    assert_eq!(fetched.email, "acme@example.com");
    assert_eq!(fetched.currency, "USD");
    assert!(fetched.created_at.is_some());
    billing.shutdown().await;
}

#[tokio::test]
async fn a_taken_external_id_is_already_exists() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    create_customer(&mut admin, "acme").await;

    let status = admin
        .create_customer(customer_request("acme"))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
}

#[tokio::test]
async fn listing_customers_pages_through_all_of_them_in_creation_order() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let mut created = Vec::new();
    for number in 0..7 {
        created.push(
            create_customer(&mut admin, &format!("customer-{number}"))
                .await
                .id,
        );
    }

    let mut page_sizes = Vec::new();
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_customers(customers_page(3, &page_token))
            .await
            .unwrap()
            .into_inner();
        page_sizes.push(page.customers.len());
        listed.extend(page.customers.into_iter().map(|customer| customer.id));
        if page.next_page_token.is_empty() || page_sizes.len() > 7 {
            break;
        }
        page_token = page.next_page_token;
    }

    assert_eq!(page_sizes, [3, 3, 1]);
    assert_eq!(
        listed.iter().collect::<HashSet<_>>().len(),
        7,
        "no duplicates"
    );
    assert_eq!(listed, created);
}

#[tokio::test]
async fn a_created_plan_keeps_what_was_asked_for() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;

    let plan = admin
        .create_plan(CreatePlanRequest {
            features: vec!["search".into(), "export".into(), "search".into()],
            ..plan_request("pro")
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(plan.code, "pro");
    assert_eq!(plan.currency, "USD");
    assert_eq!(plan.price_micros, PRICE);
    assert_eq!(plan.included_units, 1000);
    assert_eq!(plan.grace_period_seconds, 3 * 24 * 60 * 60);
    assert_eq!(
        plan.features.iter().collect::<HashSet<_>>().len(),
        plan.features.len()
    );
    assert_eq!(
        plan.features
            .iter()
            .map(String::as_str)
            .collect::<HashSet<_>>(),
        HashSet::from(["search", "export"])
    );
    assert!(plan.archived_at.is_none());
}

#[tokio::test]
async fn archived_plans_are_listed_only_when_asked_for_and_keep_their_code() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let basic = create_plan(&mut admin, plan_request("basic")).await;
    let pro = create_plan(&mut admin, plan_request("pro")).await;

    let archived = admin
        .archive_plan(archive_plan(&basic.id))
        .await
        .unwrap()
        .into_inner();
    let archived_again = admin
        .archive_plan(archive_plan(&basic.id))
        .await
        .unwrap()
        .into_inner();
    let offered = list_plans(&mut admin, false).await;
    let all = list_plans(&mut admin, true).await;
    let reused_code = admin.create_plan(plan_request("basic")).await.unwrap_err();

    assert!(archived.archived_at.is_some());
    assert_eq!(archived_again, archived);
    assert_eq!(offered, [pro.id.as_str()]);
    assert_eq!(all, [basic.id.as_str(), pro.id.as_str()]);
    assert_eq!(reused_code.code(), Code::AlreadyExists, "{reused_code:?}");
}

// ---- subscriptions -----------------------------------------------------------------------------------

#[tokio::test]
async fn subscribing_to_an_archived_plan_or_in_another_currency_is_failed_precondition() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let archived = create_plan(&mut admin, plan_request("old")).await;
    admin
        .archive_plan(archive_plan(&archived.id))
        .await
        .unwrap();
    let euro = create_plan(
        &mut admin,
        CreatePlanRequest {
            currency: "EUR".into(),
            ..plan_request("euro")
        },
    )
    .await;

    let to_archived = admin
        .create_subscription(subscribe_request(&customer.id, &archived.id))
        .await
        .unwrap_err();
    let to_euro = admin
        .create_subscription(subscribe_request(&customer.id, &euro.id))
        .await
        .unwrap_err();

    assert_eq!(
        to_archived.code(),
        Code::FailedPrecondition,
        "{to_archived:?}"
    );
    assert_eq!(to_euro.code(), Code::FailedPrecondition, "{to_euro:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_subscriptions_for_one_customer_exactly_one_succeeds() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let plan = create_plan(&mut admin, plan_request("pro")).await;
    let mut customers = Vec::new();
    for number in 0..10 {
        customers.push(create_customer(&mut admin, &format!("customer-{number}")).await);
    }

    let mut calls = JoinSet::new();
    for customer in &customers {
        for _ in 0..2 {
            let mut admin = admin.clone();
            let request = subscribe_request(&customer.id, &plan.id);
            calls.spawn(async move {
                admin
                    .create_subscription(request)
                    .await
                    .map(Response::into_inner)
            });
        }
    }
    let outcomes = calls.join_all().await;

    let created: Vec<Subscription> = outcomes
        .iter()
        .filter_map(|outcome| outcome.clone().ok())
        .collect();
    let refused: Vec<Code> = outcomes
        .iter()
        .filter_map(|outcome| outcome.as_ref().err().map(Status::code))
        .collect();
    assert_eq!(created.len(), 10, "one success per customer: {outcomes:?}");
    assert_eq!(refused, vec![Code::FailedPrecondition; 10], "{outcomes:?}");
    for customer in &customers {
        let live = admin
            .get_customer_subscription(customer_subscription_request(&customer.id))
            .await
            .unwrap()
            .into_inner();
        assert!(
            created
                .iter()
                .any(|subscription| subscription.id == live.id)
        );
    }
}

#[tokio::test]
async fn a_new_paid_subscription_is_past_due_in_grace_from_its_start_until_paid() {
    let mut world = World::subscribed_to(plan_request("pro")).await;

    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(subscription.status(), SubscriptionStatus::PastDue);
    assert_eq!(period(&subscription), (CLOCK_START, PERIOD_1_END));
    assert_eq!(past_due(&subscription), (CLOCK_START, CLOCK_START + GRACE));
    assert_eq!(entitlement.standing(), Standing::PastDueInGrace);
    assert_eq!(instant(&entitlement.grace_ends_at), CLOCK_START + GRACE);
}

#[tokio::test]
async fn an_unpaid_new_subscription_is_refused_once_grace_ends() {
    let mut world = World::subscribed_to(plan_request("pro")).await;

    world
        .billing
        .clock
        .set(CLOCK_START + GRACE + Duration::minutes(1));
    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(subscription.status(), SubscriptionStatus::PastDue);
    assert_eq!(entitlement.standing(), Standing::PastDue);
}

#[tokio::test]
async fn paying_the_first_period_makes_a_new_subscription_active() {
    let mut world = World::subscribed_to(plan_request("pro")).await;

    let payment = world.pay_subscription("evt-first").await;
    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(payment.subscription_id, world.subscription.id);
    assert_eq!(payment.outcome(), PaymentOutcome::Succeeded);
    assert_eq!(instant(&payment.paid_through), PERIOD_1_END);
    assert_eq!(subscription.status(), SubscriptionStatus::Active);
    assert_eq!(period(&subscription), (CLOCK_START, PERIOD_1_END));
    assert_eq!(instant(&subscription.paid_through), PERIOD_1_END);
    assert!(subscription.past_due_since.is_none());
    assert!(subscription.grace_ends_at.is_none());
    assert_eq!(entitlement.standing(), Standing::Good);
}

#[tokio::test]
async fn a_paid_period_that_ends_without_renewal_is_past_due_within_grace() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;

    world.billing.clock.set(PERIOD_1_END + Duration::hours(1));
    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(subscription.status(), SubscriptionStatus::PastDue);
    assert_eq!(
        past_due(&subscription),
        (PERIOD_1_END, PERIOD_1_END + GRACE)
    );
    assert_eq!(period(&subscription), (PERIOD_1_END, PERIOD_2_END));
    assert_eq!(entitlement.standing(), Standing::PastDueInGrace);
    assert_eq!(
        entitlement.subscription_status(),
        SubscriptionStatus::PastDue
    );
    assert_eq!(instant(&entitlement.grace_ends_at), PERIOD_1_END + GRACE);
    assert_eq!(instant(&entitlement.valid_until), PERIOD_1_END + GRACE);
}

#[tokio::test]
async fn a_subscription_past_due_beyond_grace_resolves_to_past_due() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;

    world
        .billing
        .clock
        .set(PERIOD_1_END + GRACE + Duration::hours(1));
    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(subscription.status(), SubscriptionStatus::PastDue);
    assert_eq!(instant(&subscription.grace_ends_at), PERIOD_1_END + GRACE);
    assert_eq!(entitlement.standing(), Standing::PastDue);
}

#[tokio::test]
async fn a_renewal_payment_while_past_due_restores_active_with_the_next_period() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;
    world
        .billing
        .clock
        .set(PERIOD_1_END + GRACE + Duration::hours(1));

    let payment = world.pay_subscription("evt-renewal").await;
    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(instant(&payment.paid_through), PERIOD_2_END);
    assert_eq!(subscription.status(), SubscriptionStatus::Active);
    assert_eq!(period(&subscription), (PERIOD_1_END, PERIOD_2_END));
    assert_eq!(instant(&subscription.paid_through), PERIOD_2_END);
    assert!(subscription.past_due_since.is_none());
    assert!(subscription.grace_ends_at.is_none());
    assert_eq!(entitlement.standing(), Standing::Good);
    assert_eq!(instant(&entitlement.period_start), PERIOD_1_END);
    assert_eq!(instant(&entitlement.period_end), PERIOD_2_END);
}

#[tokio::test]
async fn a_payment_after_more_than_a_whole_missed_period_starts_a_new_period_now() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;
    let now = datetime!(2026-04-01 09:30:00 UTC);
    world.billing.clock.set(now);

    world.pay_subscription("evt-late").await;
    let subscription = world.get_subscription().await;

    assert_eq!(subscription.status(), SubscriptionStatus::Active);
    assert_eq!(
        period(&subscription),
        (now, datetime!(2026-05-01 09:30:00 UTC))
    );
    assert_eq!(
        instant(&subscription.paid_through),
        datetime!(2026-05-01 09:30:00 UTC)
    );
}

#[tokio::test]
async fn a_failed_renewal_payment_makes_an_active_subscription_past_due() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;
    let failed_at = datetime!(2026-02-01 12:00:00 UTC);
    world.billing.clock.set(failed_at);

    let payment = world
        .admin
        .record_payment(payment_request(
            "evt-declined",
            &world.customer.id,
            PaymentPurpose::Subscription,
            PaymentOutcome::Failed,
            PRICE,
        ))
        .await
        .unwrap()
        .into_inner();
    let subscription = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(payment.outcome(), PaymentOutcome::Failed);
    assert_eq!(payment.failure_reason, "card declined");
    assert_eq!(subscription.status(), SubscriptionStatus::PastDue);
    assert_eq!(past_due(&subscription), (failed_at, failed_at + GRACE));
    assert_eq!(entitlement.standing(), Standing::PastDueInGrace);
}

#[tokio::test]
async fn cancelling_at_period_end_keeps_the_subscription_active_until_the_period_ends() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;

    let scheduled = world
        .admin
        .cancel_subscription(cancel(&world.subscription.id, true))
        .await
        .unwrap()
        .into_inner();
    let entitlement_before = world.resolve().await.unwrap();
    world.billing.clock.set(PERIOD_1_END + Duration::minutes(1));
    let ended = world.get_subscription().await;
    let entitlement_after = world.resolve().await.unwrap();
    let live = world
        .admin
        .get_customer_subscription(customer_subscription_request(&world.customer.id))
        .await;

    assert_eq!(scheduled.status(), SubscriptionStatus::Active);
    assert!(scheduled.cancel_at_period_end);
    assert_eq!(instant(&scheduled.cancel_at), PERIOD_1_END);
    assert!(scheduled.ended_at.is_none());
    assert_eq!(entitlement_before.standing(), Standing::Good);
    assert_eq!(instant(&entitlement_before.valid_until), PERIOD_1_END);
    assert_eq!(ended.status(), SubscriptionStatus::Canceled);
    assert_eq!(instant(&ended.ended_at), PERIOD_1_END);
    assert_eq!(entitlement_after.standing(), Standing::Inactive);
    assert_eq!(entitlement_after.plan_code, "pro");
    assert_eq!(live.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn asking_again_to_cancel_at_period_end_changes_nothing() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;
    let cancel = cancel(&world.subscription.id, true);
    let first = world
        .admin
        .cancel_subscription(cancel.clone())
        .await
        .unwrap()
        .into_inner();

    let second = world
        .admin
        .cancel_subscription(cancel)
        .await
        .unwrap()
        .into_inner();

    assert_eq!(second, first);
}

#[tokio::test]
async fn cancelling_now_ends_the_subscription_and_cancelling_again_is_failed_precondition() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;
    let cancel_now = cancel(&world.subscription.id, false);

    let canceled = world
        .admin
        .cancel_subscription(cancel_now.clone())
        .await
        .unwrap()
        .into_inner();
    let entitlement = world.resolve().await.unwrap();
    let again = world
        .admin
        .cancel_subscription(cancel_now)
        .await
        .unwrap_err();

    assert_eq!(canceled.status(), SubscriptionStatus::Canceled);
    assert_eq!(instant(&canceled.ended_at), CLOCK_START);
    assert_eq!(entitlement.standing(), Standing::Inactive);
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

#[tokio::test]
async fn an_unpaid_trial_is_trialing_until_it_ends_then_expired() {
    let mut world = World::subscribed_to(CreatePlanRequest {
        trial_days: 14,
        ..plan_request("pro")
    })
    .await;
    let trial_end = CLOCK_START + Duration::days(14);

    let trialing = world.get_subscription().await;
    let entitlement_during = world.resolve().await.unwrap();
    world.billing.clock.set(trial_end + Duration::minutes(1));
    let expired = world.get_subscription().await;
    let entitlement_after = world.resolve().await.unwrap();

    assert_eq!(trialing.status(), SubscriptionStatus::Trialing);
    assert_eq!(instant(&trialing.trial_ends_at), trial_end);
    assert_eq!(entitlement_during.standing(), Standing::Good);
    assert_eq!(instant(&entitlement_during.valid_until), trial_end);
    assert_eq!(expired.status(), SubscriptionStatus::Expired);
    assert_eq!(instant(&expired.ended_at), trial_end);
    assert_eq!(entitlement_after.standing(), Standing::Inactive);
}

#[tokio::test]
async fn a_free_plan_stays_active_across_periods() {
    let mut world = World::subscribed_to(free_plan_request("free")).await;

    let first = world.get_subscription().await;
    world.billing.clock.set(datetime!(2026-03-20 08:00:00 UTC));
    let third = world.get_subscription().await;
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(first.status(), SubscriptionStatus::Active);
    assert_eq!(instant(&first.current_period_end), PERIOD_1_END);
    assert_eq!(third.status(), SubscriptionStatus::Active);
    assert_eq!(
        period(&third),
        (PERIOD_2_END, datetime!(2026-04-15 12:00:00 UTC))
    );
    assert_eq!(entitlement.standing(), Standing::Good);
    assert_eq!(instant(&entitlement.period_start), PERIOD_2_END);
}

#[tokio::test]
async fn changing_the_plan_keeps_the_billing_anchor_and_paid_through() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;
    let team = create_plan(
        &mut world.admin,
        CreatePlanRequest {
            included_units: 5000,
            ..plan_request("team")
        },
    )
    .await;
    world.billing.clock.set(datetime!(2026-02-01 00:00:00 UTC));

    let changed = world
        .admin
        .change_subscription_plan(change_plan(&world.subscription.id, &team.id))
        .await
        .unwrap()
        .into_inner();
    let entitlement = world.resolve().await.unwrap();

    assert_eq!(changed.plan_id, team.id);
    assert_eq!(changed.plan_code, "team");
    assert_eq!(changed.status(), SubscriptionStatus::Active);
    assert_eq!(period(&changed), (CLOCK_START, PERIOD_1_END));
    assert_eq!(instant(&changed.paid_through), PERIOD_1_END);
    assert_eq!(entitlement.plan_code, "team");
    assert_eq!(entitlement.limits.expect("limits").included_units, 5000);
}

#[tokio::test]
async fn changing_to_an_archived_plan_or_changing_an_ended_subscription_is_failed_precondition() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    let archived = create_plan(&mut world.admin, plan_request("old")).await;
    world
        .admin
        .archive_plan(archive_plan(&archived.id))
        .await
        .unwrap();
    let team = create_plan(&mut world.admin, plan_request("team")).await;

    let to_archived = world
        .admin
        .change_subscription_plan(change_plan(&world.subscription.id, &archived.id))
        .await
        .unwrap_err();
    world
        .admin
        .cancel_subscription(cancel(&world.subscription.id, false))
        .await
        .unwrap();
    let after_end = world
        .admin
        .change_subscription_plan(change_plan(&world.subscription.id, &team.id))
        .await
        .unwrap_err();

    assert_eq!(
        to_archived.code(),
        Code::FailedPrecondition,
        "{to_archived:?}"
    );
    assert_eq!(after_end.code(), Code::FailedPrecondition, "{after_end:?}");
}

// ---- payments and credits ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_payments_are_recorded_once() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let request = top_up(&customer.id, "evt-top-up", 5_000_000);

    let mut calls = JoinSet::new();
    for _ in 0..50 {
        let mut admin = admin.clone();
        let request = request.clone();
        calls.spawn(async move {
            admin
                .record_payment(request)
                .await
                .map(Response::into_inner)
        });
    }
    let payments: Vec<Payment> = calls
        .join_all()
        .await
        .into_iter()
        .map(|payment| payment.expect("every identical call succeeds"))
        .collect();
    let ledger = list_ledger(&mut admin, &customer.id).await;
    let recorded = list_audit_events(&mut admin, &payments[0].id).await;

    assert!(
        payments.iter().all(|payment| *payment == payments[0]),
        "{payments:#?}"
    );
    assert_eq!(payments[0].amount_micros, 5_000_000);
    assert_eq!(payments[0].currency, "USD");
    assert_eq!(ledger.len(), 1, "{ledger:#?}");
    assert_eq!(ledger[0].id, payments[0].ledger_entry_id);
    assert_eq!(ledger[0].kind(), LedgerEntryKind::TopUp);
    assert_eq!(ledger[0].delta_micros, 5_000_000);
    assert_eq!(ledger[0].reference, format!("payment:{}", payments[0].id));
    assert_eq!(credit_balance(&mut admin, &customer.id).await, 5_000_000);
    assert_eq!(
        count_actions(&recorded, "payment.record"),
        1,
        "{recorded:#?}"
    );
}

#[tokio::test]
async fn reusing_a_payment_key_for_a_different_amount_is_already_exists_and_writes_nothing() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    admin
        .record_payment(top_up(&customer.id, "evt-top-up", 5_000_000))
        .await
        .unwrap();
    let ledger_before = list_ledger(&mut admin, &customer.id).await;

    let status = admin
        .record_payment(top_up(&customer.id, "evt-top-up", 7_000_000))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(list_ledger(&mut admin, &customer.id).await, ledger_before);
    assert_eq!(credit_balance(&mut admin, &customer.id).await, 5_000_000);
}

#[tokio::test]
async fn granting_credits_twice_with_one_reference_applies_once() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let first = admin
        .grant_credits(grant(&customer.id, 3_000_000, "welcome"))
        .await
        .unwrap()
        .into_inner();

    let second = admin
        .grant_credits(grant(&customer.id, 3_000_000, "welcome"))
        .await
        .unwrap()
        .into_inner();
    let different = admin
        .grant_credits(grant(&customer.id, 4_000_000, "welcome"))
        .await
        .unwrap_err();

    assert_eq!(second, first);
    assert_eq!(different.code(), Code::AlreadyExists, "{different:?}");
    assert_eq!(list_ledger(&mut admin, &customer.id).await, [first]);
    assert_eq!(credit_balance(&mut admin, &customer.id).await, 3_000_000);
}

#[tokio::test]
async fn the_balance_is_the_sum_of_the_ledger_after_grants_adjustments_top_ups_and_usage() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    let customer_id = world.customer.id.clone();
    let admin = &mut world.admin;
    admin
        .grant_credits(grant(&customer_id, 10_000_000, "welcome"))
        .await
        .unwrap();
    admin
        .adjust_credits(adjust(&customer_id, 2_000_000, "goodwill"))
        .await
        .unwrap();
    admin
        .adjust_credits(adjust(&customer_id, -500_000, "correction"))
        .await
        .unwrap();
    admin
        .record_payment(top_up(&customer_id, "evt-top-up", 5_000_000))
        .await
        .unwrap();
    admin
        .record_payment(RecordPaymentRequest {
            outcome: PaymentOutcome::Failed.into(),
            failure_reason: "card declined".into(),
            ..top_up(&customer_id, "evt-top-up-declined", 1_000_000)
        })
        .await
        .unwrap();
    let report = usage_report("report-1", &world.subscription, 40, 1_234_567);
    world.entitlements.report_usage(report).await.unwrap();

    let balance = credit_balance(&mut world.admin, &customer_id).await;
    let ledger = list_ledger(&mut world.admin, &customer_id).await;
    let internal_balance = world
        .entitlements
        .get_credit_balance(balance_request(&customer_id))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(
        balance,
        10_000_000 + 2_000_000 - 500_000 + 5_000_000 - 1_234_567
    );
    assert_eq!(
        ledger.iter().map(|entry| entry.delta_micros).sum::<i64>(),
        balance
    );
    assert_eq!(
        ledger.iter().map(LedgerEntry::kind).collect::<Vec<_>>(),
        [
            LedgerEntryKind::TopUp,
            LedgerEntryKind::Adjustment,
            LedgerEntryKind::Adjustment,
            LedgerEntryKind::TopUp,
            LedgerEntryKind::Usage,
        ]
    );
    assert_eq!(internal_balance.balance_micros, balance);
    assert_eq!(internal_balance.currency, "USD");
}

#[tokio::test]
async fn ledger_references_follow_the_documented_formats() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    let customer_id = world.customer.id.clone();
    let admin = &mut world.admin;
    admin
        .grant_credits(grant(&customer_id, 10_000_000, "welcome"))
        .await
        .unwrap();
    admin
        .adjust_credits(adjust(&customer_id, -500_000, "correction"))
        .await
        .unwrap();
    let payment = admin
        .record_payment(top_up(&customer_id, "evt-top-up", 5_000_000))
        .await
        .unwrap()
        .into_inner();
    let report = usage_report("report-1", &world.subscription, 40, 1_234_567);
    world.entitlements.report_usage(report).await.unwrap();

    let ledger = list_ledger(&mut world.admin, &customer_id).await;

    let references: Vec<&str> = ledger
        .iter()
        .map(|entry| entry.reference.as_str())
        .collect();
    assert_eq!(
        references,
        [
            "grant:welcome".to_string(),
            "adjustment:correction".to_string(),
            format!("payment:{}", payment.id),
            "usage:report-1/entry".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_usage_report_sent_twice_is_applied_once() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    let customer_id = world.customer.id.clone();
    world
        .admin
        .grant_credits(grant(&customer_id, 10_000_000, "welcome"))
        .await
        .unwrap();
    let report = usage_report("report-1", &world.subscription, 40, 1_000_000);
    let first = world
        .entitlements
        .report_usage(report.clone())
        .await
        .unwrap()
        .into_inner();
    let balance_after_first = credit_balance(&mut world.admin, &customer_id).await;

    let second = world
        .entitlements
        .report_usage(report)
        .await
        .unwrap()
        .into_inner();

    assert!(!first.duplicate);
    assert_eq!(first.applied_entries, 1);
    assert!(second.duplicate);
    assert_eq!(second.applied_entries, 0);
    assert_eq!(balance_after_first, 9_000_000);
    assert_eq!(
        credit_balance(&mut world.admin, &customer_id).await,
        9_000_000
    );
    assert_eq!(list_ledger(&mut world.admin, &customer_id).await.len(), 2);
}

#[tokio::test]
async fn an_entry_regrouped_into_a_new_report_is_not_applied_again() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    let customer_id = world.customer.id.clone();
    world
        .admin
        .grant_credits(grant(&customer_id, 10_000_000, "welcome"))
        .await
        .unwrap();
    let first = usage_report("report-1", &world.subscription, 40, 1_000_000);
    world
        .entitlements
        .report_usage(first.clone())
        .await
        .unwrap();
    let mut regrouped = usage_report("report-2", &world.subscription, 5, 100_000);
    regrouped.entries.push(first.entries[0].clone());

    let response = world
        .entitlements
        .report_usage(regrouped)
        .await
        .unwrap()
        .into_inner();

    assert!(!response.duplicate);
    assert_eq!(response.applied_entries, 1);
    assert_eq!(
        credit_balance(&mut world.admin, &customer_id).await,
        8_900_000
    );
}

#[tokio::test]
async fn a_usage_report_id_reused_with_other_contents_is_already_exists() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    world
        .admin
        .grant_credits(grant(&world.customer.id, 10_000_000, "welcome"))
        .await
        .unwrap();
    world
        .entitlements
        .report_usage(usage_report("report-1", &world.subscription, 40, 1_000_000))
        .await
        .unwrap();

    let status = world
        .entitlements
        .report_usage(usage_report("report-1", &world.subscription, 41, 1_000_000))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(
        credit_balance(&mut world.admin, &world.customer.id).await,
        9_000_000
    );
}

#[tokio::test]
async fn reported_usage_shows_up_per_period_in_customer_usage() {
    let mut world = World::subscribed_to(credits_plan_request("metered")).await;
    world
        .admin
        .grant_credits(grant(&world.customer.id, 10_000_000, "welcome"))
        .await
        .unwrap();
    for (report_id, units, credits) in [("report-1", 30, 500_000), ("report-2", 12, 250_000)] {
        world
            .entitlements
            .report_usage(usage_report(report_id, &world.subscription, units, credits))
            .await
            .unwrap();
    }

    let usage = world
        .admin
        .get_customer_usage(usage_request(&world.customer.id))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(usage.periods.len(), 1, "{usage:#?}");
    assert_eq!(usage.periods[0].subscription_id, world.subscription.id);
    assert_eq!(instant(&usage.periods[0].period_start), CLOCK_START);
    assert_eq!(usage.periods[0].units, 42);
    assert_eq!(usage.periods[0].credits_micros, 750_000);
}

#[tokio::test]
async fn a_negative_adjustment_beyond_the_balance_is_failed_precondition_and_changes_nothing() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    admin
        .grant_credits(grant(&customer.id, 1_000_000, "welcome"))
        .await
        .unwrap();

    let status = admin
        .adjust_credits(adjust(&customer.id, -1_000_001, "too-much"))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(credit_balance(&mut admin, &customer.id).await, 1_000_000);
    assert_eq!(list_ledger(&mut admin, &customer.id).await.len(), 1);
}

// ---- API keys and entitlements -----------------------------------------------------------------------

#[tokio::test]
async fn resolving_a_key_digest_returns_its_customer_plan_and_standing() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    world.pay_subscription("evt-first").await;

    let entitlement = world.resolve().await.unwrap();

    let key = world.key.key.as_ref().expect("issued key");
    assert_eq!(entitlement.key_id, key.id);
    assert_eq!(entitlement.customer_id, world.customer.id);
    assert_eq!(entitlement.customer_external_id, "acme");
    assert_eq!(entitlement.standing(), Standing::Good);
    assert_eq!(entitlement.subscription_id, world.subscription.id);
    assert_eq!(
        entitlement.subscription_status(),
        SubscriptionStatus::Active
    );
    assert_eq!(entitlement.plan_code, "pro");
    assert_eq!(entitlement.features, ["search"]);
    assert_eq!(entitlement.currency, "USD");
    let limits = entitlement.limits.expect("limits");
    assert_eq!(limits.included_units, 1000);
    assert_eq!(limits.overage_mode(), OverageMode::Block);
    assert_eq!(instant(&entitlement.period_start), CLOCK_START);
    assert_eq!(instant(&entitlement.period_end), PERIOD_1_END);
    assert_eq!(instant(&entitlement.valid_until), PERIOD_1_END);
}

#[tokio::test]
async fn a_key_of_a_customer_without_a_subscription_resolves_to_no_subscription() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let mut entitlements = billing.entitlements().await;
    let customer = create_customer(&mut admin, "acme").await;
    let issued = issue_key(&mut admin, &customer.id).await;

    let entitlement = resolve(&mut entitlements, &issued.secret).await.unwrap();

    assert_eq!(entitlement.customer_id, customer.id);
    assert_eq!(entitlement.standing(), Standing::NoSubscription);
    assert!(entitlement.subscription_id.is_empty());
    assert!(entitlement.plan_code.is_empty());
}

#[tokio::test]
async fn revoked_expired_and_unknown_keys_are_not_found_with_the_same_message() {
    let mut world = World::subscribed_to(plan_request("pro")).await;
    let revoked_id = world.key.key.as_ref().expect("issued key").id.clone();
    world
        .admin
        .revoke_api_key(revoke(&revoked_id))
        .await
        .unwrap();
    let expiring = issue_key(&mut world.admin, &world.customer.id).await;
    let rotation = RotateApiKeyRequest {
        key_id: expiring.key.as_ref().expect("issued key").id.clone(),
        grace_seconds: 60,
    };
    world.admin.rotate_api_key(rotation).await.unwrap();
    world.billing.clock.advance(Duration::seconds(61));
    let unknown_secret = proto::api_key::assemble("UnknownUnknownUnknownUnknownUnkno");

    let revoked = world.resolve().await.unwrap_err();
    let expired = resolve(&mut world.entitlements, &expiring.secret)
        .await
        .unwrap_err();
    let unknown = resolve(&mut world.entitlements, &unknown_secret)
        .await
        .unwrap_err();

    assert_eq!(revoked.code(), Code::NotFound);
    assert_eq!(expired.code(), Code::NotFound);
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(revoked.message().as_bytes(), unknown.message().as_bytes());
    assert_eq!(expired.message().as_bytes(), unknown.message().as_bytes());
}

#[tokio::test]
async fn an_issued_key_is_well_formed_and_listed_by_its_prefix_only() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let first = issue_key(&mut admin, &customer.id).await;

    let second = issue_key(&mut admin, &customer.id).await;
    let listed = admin
        .list_api_keys(keys_request(&customer.id))
        .await
        .unwrap()
        .into_inner();

    assert!(
        proto::api_key::is_well_formed(&first.secret),
        "{}",
        first.secret
    );
    assert!(
        proto::api_key::is_well_formed(&second.secret),
        "{}",
        second.secret
    );
    assert_ne!(first.secret, second.secret);
    let listed_ids: Vec<&str> = listed.keys.iter().map(|key| key.id.as_str()).collect();
    let issued_ids =
        [&second, &first].map(|issued| issued.key.as_ref().expect("issued key").id.as_str());
    assert_eq!(listed_ids, issued_ids, "newest first");
    for (key, issued) in listed.keys.iter().zip([&second, &first]) {
        assert_eq!(key.prefix, issued.secret[..12]);
        assert_eq!(key.prefix.len(), proto::api_key::DISPLAY_PREFIX_LEN);
    }
    let listing = format!("{listed:?}");
    for issued in [&first, &second] {
        assert!(
            !listing.contains(&issued.secret[12..]),
            "a listing shows no secrets"
        );
    }
}

#[tokio::test]
async fn revoking_a_revoked_key_returns_it_unchanged() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let issued = issue_key(&mut admin, &customer.id).await;
    let key_id = issued.key.as_ref().expect("issued key").id.clone();
    let revoked = admin
        .revoke_api_key(revoke(&key_id))
        .await
        .unwrap()
        .into_inner();

    let again = admin
        .revoke_api_key(revoke(&key_id))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(instant(&revoked.revoked_at), CLOCK_START);
    assert_eq!(again, revoked);
}

#[tokio::test]
async fn rotating_a_key_without_grace_retires_the_old_key_at_once() {
    let mut world = World::subscribed_to(free_plan_request("free")).await;
    let old = world.key.key.clone().expect("issued key");

    let rotated = world
        .admin
        .rotate_api_key(RotateApiKeyRequest {
            key_id: old.id.clone(),
            grace_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let old_resolves = world.resolve().await;
    let new_resolves = resolve(&mut world.entitlements, &rotated.secret).await;

    let new = rotated.key.as_ref().expect("issued key");
    assert!(proto::api_key::is_well_formed(&rotated.secret));
    assert_ne!(rotated.secret, world.key.secret);
    assert_eq!(new.replaces_key_id, old.id);
    assert_eq!(new.customer_id, old.customer_id);
    assert_eq!(new.name, old.name);
    assert_eq!(old_resolves.unwrap_err().code(), Code::NotFound);
    assert_eq!(new_resolves.unwrap().key_id, new.id);
}

#[tokio::test]
async fn rotating_a_key_with_grace_keeps_the_old_key_working_until_the_grace_ends() {
    let mut world = World::subscribed_to(free_plan_request("free")).await;
    let old_id = world.key.key.as_ref().expect("issued key").id.clone();

    world
        .admin
        .rotate_api_key(RotateApiKeyRequest {
            key_id: old_id,
            grace_seconds: 3600,
        })
        .await
        .unwrap();
    let during_grace = world.resolve().await;
    world
        .billing
        .clock
        .set(CLOCK_START + Duration::hours(1) + Duration::seconds(1));
    let after_grace = world.resolve().await;

    let during_grace = during_grace.unwrap();
    assert_eq!(
        instant(&during_grace.valid_until),
        CLOCK_START + Duration::hours(1)
    );
    assert_eq!(after_grace.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn rotating_a_revoked_key_is_failed_precondition() {
    let mut world = World::subscribed_to(free_plan_request("free")).await;
    let key_id = world.key.key.as_ref().expect("issued key").id.clone();
    world.admin.revoke_api_key(revoke(&key_id)).await.unwrap();

    let status = world
        .admin
        .rotate_api_key(RotateApiKeyRequest {
            key_id,
            grace_seconds: 0,
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

// ---- change stream -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_through_one_instance_is_announced_on_the_change_stream_of_another() {
    let db = fresh_database().await;
    let instance_a = spawn_billing(db.clone()).await;
    let instance_b = spawn_billing_with_clock(db, instance_a.clock.clone()).await;
    let mut admin = instance_a.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let issued = issue_key(&mut admin, &customer.id).await;
    let mut changes = instance_b
        .entitlements()
        .await
        .watch_changes(WatchChangesRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = timeout(FAILURE_BOUND, changes.message())
        .await
        .expect("a first message within the bound")
        .unwrap()
        .expect("the stream is open");
    assert!(
        matches!(first.change, Some(Change::Heartbeat(_))),
        "{first:?}"
    );

    admin
        .revoke_api_key(revoke(&issued.key.as_ref().expect("issued key").id))
        .await
        .unwrap();
    let (sequence, key) = timeout(FAILURE_BOUND, async {
        loop {
            let event = changes
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            if let Some(Change::KeyChanged(key)) = event.change {
                return (event.sequence, key);
            }
        }
    })
    .await
    .expect("a KeyChanged event within the bound");

    assert_eq!(key.key_digest, key_digest(&issued.secret));
    assert_eq!(key.customer_id, customer.id);
    assert!(sequence > first.sequence);
    drop(changes);
    instance_b.shutdown().await;
    instance_a.shutdown().await;
}

#[tokio::test]
async fn shutting_down_billing_ends_open_change_streams() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut changes = billing
        .entitlements()
        .await
        .watch_changes(WatchChangesRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    timeout(FAILURE_BOUND, changes.message())
        .await
        .expect("a first message within the bound")
        .unwrap()
        .expect("a heartbeat");

    timeout(FAILURE_BOUND, billing.shutdown())
        .await
        .expect("shutdown does not wait for open streams");
    let after = timeout(FAILURE_BOUND, changes.message())
        .await
        .expect("the stream ends within the bound");

    assert!(!matches!(after, Ok(Some(_))), "{after:?}");
}

// ---- audit log ---------------------------------------------------------------------------------------

#[tokio::test]
async fn every_mutation_is_audited_with_its_actor() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let alice = "alice@example.com";
    let customer = admin
        .create_customer(as_actor(alice, customer_request("acme")))
        .await
        .unwrap()
        .into_inner();
    let pro = admin
        .create_plan(as_actor(alice, plan_request("pro")))
        .await
        .unwrap()
        .into_inner();
    let team = admin
        .create_plan(as_actor(alice, plan_request("team")))
        .await
        .unwrap()
        .into_inner();
    let subscription = admin
        .create_subscription(as_actor(alice, subscribe_request(&customer.id, &pro.id)))
        .await
        .unwrap()
        .into_inner();
    let payment = admin
        .record_payment(as_actor(
            alice,
            payment_request(
                "evt-first",
                &customer.id,
                PaymentPurpose::Subscription,
                PaymentOutcome::Succeeded,
                PRICE,
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    admin
        .change_subscription_plan(as_actor(alice, change_plan(&subscription.id, &team.id)))
        .await
        .unwrap();
    admin
        .cancel_subscription(as_actor(alice, cancel(&subscription.id, true)))
        .await
        .unwrap();
    admin
        .archive_plan(as_actor(alice, archive_plan(&pro.id)))
        .await
        .unwrap();
    admin
        .grant_credits(as_actor(alice, grant(&customer.id, 1_000_000, "welcome")))
        .await
        .unwrap();
    admin
        .adjust_credits(as_actor(alice, adjust(&customer.id, -1000, "correction")))
        .await
        .unwrap();
    let issued = issue_key(&mut admin, &customer.id).await;
    let issued_id = issued.key.as_ref().expect("issued key").id.clone();
    let rotated = admin
        .rotate_api_key(as_actor(
            alice,
            RotateApiKeyRequest {
                key_id: issued_id.clone(),
                grace_seconds: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let rotated_id = rotated.key.as_ref().expect("issued key").id.clone();
    admin
        .revoke_api_key(as_actor("bob", revoke(&rotated_id)))
        .await
        .unwrap();

    let events = list_audit_events(&mut admin, "").await;

    let find = |action: &str, target_id: &str| {
        events
            .iter()
            .find(|event| event.action == action && event.target_id == target_id)
            .unwrap_or_else(|| panic!("no `{action}` event for `{target_id}` in {events:#?}"))
    };
    let about = |target_type: &str, target_id: &str| {
        events
            .iter()
            .filter(|event| event.target_type == target_type && event.target_id == target_id)
            .count()
    };
    let created = find("customer.create", &customer.id);
    assert_eq!(created.actor, alice);
    assert_eq!(created.target_type, "customer");
    assert_eq!(find("payment.record", &payment.id).actor, alice);
    let revoked = find("api_key.revoke", &rotated_id);
    assert_eq!(revoked.actor, "bob");
    assert_eq!(revoked.target_type, "api_key");
    assert_eq!(
        about("plan", &pro.id),
        2,
        "create and archive of `pro`: {events:#?}"
    );
    assert_eq!(about("plan", &team.id), 1, "create of `team`: {events:#?}");
    assert_eq!(
        about("subscription", &subscription.id),
        3,
        "create, change, cancel: {events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|event| event.target_type == "ledger")
            .count(),
        2,
        "grant and adjust: {events:#?}"
    );
    let issued_event = events
        .iter()
        .find(|event| {
            event.target_type == "api_key" && event.target_id == issued_id && event.actor == "admin"
        })
        .unwrap_or_else(|| panic!("no event by `admin` about the issued key in {events:#?}"));
    assert!(
        issued_event.action.starts_with("api_key."),
        "{issued_event:?}"
    );
    assert!(
        events
            .iter()
            .any(|event| event.action.starts_with("api_key.") && event.actor == alice),
        "rotation audited: {events:#?}"
    );
    for event in &events {
        let (noun, verb) = event.action.split_once('.').unwrap_or_default();
        assert!(
            !noun.is_empty() && !verb.is_empty(),
            "`noun.verb`: {event:?}"
        );
        assert!(
            event.details_json.starts_with('{'),
            "a JSON object: {event:?}"
        );
        assert!(
            !event.details_json.contains(&issued.secret),
            "no secrets: {event:?}"
        );
        assert!(
            !event.details_json.contains(&rotated.secret),
            "no secrets: {event:?}"
        );
    }
}

#[tokio::test]
async fn audit_events_about_one_target_are_listed_newest_first() {
    let billing = spawn_billing(fresh_database().await).await;
    let mut admin = billing.admin().await;
    let customer = create_customer(&mut admin, "acme").await;
    let issued = issue_key(&mut admin, &customer.id).await;
    let key_id = issued.key.as_ref().expect("issued key").id.clone();
    admin
        .revoke_api_key(as_actor("bob", revoke(&key_id)))
        .await
        .unwrap();

    let events = list_audit_events(&mut admin, &key_id).await;

    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0].action, "api_key.revoke");
    assert_eq!(events[0].actor, "bob");
    assert!(events.iter().all(|event| event.target_id == key_id));
    assert_eq!(events[1].actor, "admin");
}

// ---- fixtures ----------------------------------------------------------------------------------------

/// A customer `acme` with one API key and a subscription to one plan, on a billing instance of its own.
struct World {
    billing: BillingInstance,
    admin: AdminClient,
    entitlements: EntitlementsClient,
    customer: Customer,
    plan: Plan,
    subscription: Subscription,
    key: IssuedApiKey,
}

impl World {
    async fn subscribed_to(plan: CreatePlanRequest) -> Self {
        let billing = spawn_billing(fresh_database().await).await;
        let mut admin = billing.admin().await;
        let entitlements = billing.entitlements().await;
        let customer = create_customer(&mut admin, "acme").await;
        let plan = create_plan(&mut admin, plan).await;
        let subscription = admin
            .create_subscription(subscribe_request(&customer.id, &plan.id))
            .await
            .unwrap()
            .into_inner();
        let key = issue_key(&mut admin, &customer.id).await;
        Self {
            billing,
            admin,
            entitlements,
            customer,
            plan,
            subscription,
            key,
        }
    }

    /// Records a succeeded payment of one period's price for the subscription.
    async fn pay_subscription(&mut self, idempotency_key: &str) -> Payment {
        self.admin
            .record_payment(payment_request(
                idempotency_key,
                &self.customer.id,
                PaymentPurpose::Subscription,
                PaymentOutcome::Succeeded,
                self.plan.price_micros,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn get_subscription(&mut self) -> Subscription {
        self.admin
            .get_subscription(get_subscription_request(&self.subscription.id))
            .await
            .unwrap()
            .into_inner()
    }

    async fn resolve(&mut self) -> Result<Entitlement, Status> {
        resolve(&mut self.entitlements, &self.key.secret).await
    }
}

/// Returns the bounds of the subscription's current period.
fn period(subscription: &Subscription) -> (OffsetDateTime, OffsetDateTime) {
    (
        instant(&subscription.current_period_start),
        instant(&subscription.current_period_end),
    )
}

/// Returns when the subscription became past due and when its grace ends.
fn past_due(subscription: &Subscription) -> (OffsetDateTime, OffsetDateTime) {
    (
        instant(&subscription.past_due_since),
        instant(&subscription.grace_ends_at),
    )
}

fn free_plan_request(code: &str) -> CreatePlanRequest {
    CreatePlanRequest {
        price_micros: 0,
        ..plan_request(code)
    }
}

fn credits_plan_request(code: &str) -> CreatePlanRequest {
    CreatePlanRequest {
        price_micros: 0,
        overage_mode: OverageMode::Credits.into(),
        unit_price_micros: 1000,
        ..plan_request(code)
    }
}

fn usage_report(
    report_id: &str,
    subscription: &Subscription,
    units: i64,
    credits_micros: i64,
) -> ReportUsageRequest {
    ReportUsageRequest {
        report_id: report_id.into(),
        entries: vec![UsageEntry {
            entry_id: format!("{report_id}/entry"),
            customer_id: subscription.customer_id.clone(),
            subscription_id: subscription.id.clone(),
            period_start: subscription.current_period_start,
            units,
            credits_micros,
            outbox_sequence: 0,
        }],
    }
}

fn top_up(customer_id: &str, key: &str, amount_micros: i64) -> RecordPaymentRequest {
    payment_request(
        key,
        customer_id,
        PaymentPurpose::CreditTopUp,
        PaymentOutcome::Succeeded,
        amount_micros,
    )
}

fn grant(customer_id: &str, amount_micros: i64, reference: &str) -> GrantCreditsRequest {
    GrantCreditsRequest {
        customer_id: customer_id.into(),
        amount_micros,
        reference: reference.into(),
        note: "promotion".into(),
    }
}

fn adjust(customer_id: &str, delta_micros: i64, reference: &str) -> AdjustCreditsRequest {
    AdjustCreditsRequest {
        customer_id: customer_id.into(),
        delta_micros,
        reference: reference.into(),
        note: "operator correction".into(),
    }
}

fn customers_page(page_size: u32, page_token: &str) -> ListCustomersRequest {
    ListCustomersRequest {
        page_size,
        page_token: page_token.into(),
    }
}

fn customer_subscription_request(customer_id: &str) -> GetCustomerSubscriptionRequest {
    GetCustomerSubscriptionRequest {
        customer_id: customer_id.into(),
    }
}

fn change_plan(subscription_id: &str, plan_id: &str) -> ChangeSubscriptionPlanRequest {
    ChangeSubscriptionPlanRequest {
        subscription_id: subscription_id.into(),
        plan_id: plan_id.into(),
    }
}

fn cancel(subscription_id: &str, at_period_end: bool) -> CancelSubscriptionRequest {
    CancelSubscriptionRequest {
        subscription_id: subscription_id.into(),
        at_period_end,
    }
}

fn keys_request(customer_id: &str) -> ListApiKeysRequest {
    ListApiKeysRequest {
        customer_id: customer_id.into(),
    }
}

fn usage_request(customer_id: &str) -> GetCustomerUsageRequest {
    GetCustomerUsageRequest {
        customer_id: customer_id.into(),
        max_periods: 0,
    }
}

fn audit_page(target_id: &str, page_size: u32) -> ListAuditEventsRequest {
    ListAuditEventsRequest {
        target_id: target_id.into(),
        page_size,
        page_token: String::new(),
    }
}

fn get_customer(customer_id: &str) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: customer_id.into(),
        ..Default::default()
    }
}

fn archive_plan(plan_id: &str) -> ArchivePlanRequest {
    ArchivePlanRequest {
        plan_id: plan_id.into(),
    }
}

fn subscribe_request(customer_id: &str, plan_id: &str) -> CreateSubscriptionRequest {
    CreateSubscriptionRequest {
        customer_id: customer_id.into(),
        plan_id: plan_id.into(),
    }
}

fn get_subscription_request(subscription_id: &str) -> GetSubscriptionRequest {
    GetSubscriptionRequest {
        subscription_id: subscription_id.into(),
    }
}

fn balance_request(customer_id: &str) -> GetCreditBalanceRequest {
    GetCreditBalanceRequest {
        customer_id: customer_id.into(),
    }
}

fn ledger_request(customer_id: &str) -> ListLedgerEntriesRequest {
    ListLedgerEntriesRequest {
        customer_id: customer_id.into(),
        page_size: 0,
        page_token: String::new(),
    }
}

fn issue_key_request(customer_id: &str) -> IssueApiKeyRequest {
    IssueApiKeyRequest {
        customer_id: customer_id.into(),
        name: "production".into(),
    }
}

fn revoke(key_id: &str) -> RevokeApiKeyRequest {
    RevokeApiKeyRequest {
        key_id: key_id.into(),
    }
}

async fn create_customer(admin: &mut AdminClient, external_id: &str) -> Customer {
    admin
        .create_customer(customer_request(external_id))
        .await
        .unwrap()
        .into_inner()
}

async fn create_plan(admin: &mut AdminClient, plan: CreatePlanRequest) -> Plan {
    admin.create_plan(plan).await.unwrap().into_inner()
}

async fn issue_key(admin: &mut AdminClient, customer_id: &str) -> IssuedApiKey {
    admin
        .issue_api_key(issue_key_request(customer_id))
        .await
        .unwrap()
        .into_inner()
}

async fn resolve(
    entitlements: &mut EntitlementsClient,
    secret: &str,
) -> Result<Entitlement, Status> {
    entitlements
        .resolve(ResolveRequest {
            key_digest: key_digest(secret),
        })
        .await
        .map(Response::into_inner)
}

async fn list_plans(admin: &mut AdminClient, include_archived: bool) -> Vec<String> {
    let plans = admin
        .list_plans(ListPlansRequest { include_archived })
        .await
        .unwrap()
        .into_inner()
        .plans;
    plans.into_iter().map(|plan| plan.id).collect()
}

async fn credit_balance(admin: &mut AdminClient, customer_id: &str) -> i64 {
    admin
        .get_credit_balance(balance_request(customer_id))
        .await
        .unwrap()
        .into_inner()
        .balance_micros
}

async fn list_ledger(admin: &mut AdminClient, customer_id: &str) -> Vec<LedgerEntry> {
    let page = admin
        .list_ledger_entries(ledger_request(customer_id))
        .await
        .unwrap()
        .into_inner();
    assert!(
        page.next_page_token.is_empty(),
        "tests keep ledgers within one page"
    );
    page.entries
}

/// Returns the audit events about `target_id` (all of them when empty), newest first.
async fn list_audit_events(admin: &mut AdminClient, target_id: &str) -> Vec<AuditEvent> {
    let page = admin
        .list_audit_events(audit_page(target_id, 500))
        .await
        .unwrap()
        .into_inner();
    assert!(
        page.next_page_token.is_empty(),
        "tests keep audit logs within one page"
    );
    page.events
}

fn count_actions(events: &[AuditEvent], action: &str) -> usize {
    events.iter().filter(|event| event.action == action).count()
}

// ---- table-driven checks -----------------------------------------------------------------------------

/// Asserts that every call failed with `expected`, listing every one that did not.
fn assert_every_outcome_is(outcomes: Vec<(&str, Result<(), Status>)>, expected: Code) {
    let wrong: Vec<String> = outcomes
        .into_iter()
        .filter_map(|(call, outcome)| match outcome {
            Err(status) if status.code() == expected => None,
            Err(status) => Some(format!(
                "{call}: {:?} {:?}",
                status.code(),
                status.message()
            )),
            Ok(()) => Some(format!("{call}: succeeded")),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "expected {expected:?} from every call, but:\n{}",
        wrong.join("\n")
    );
}

/// Calls every `BillingAdmin` RPC with an empty request: a refused token must be refused before anything
/// else is looked at.
async fn call_every_admin_rpc(admin: &mut AdminClient) -> Vec<(&'static str, Result<(), Status>)> {
    outcomes! {
        "CreateCustomer": admin.create_customer(CreateCustomerRequest::default());
        "GetCustomer": admin.get_customer(GetCustomerRequest::default());
        "ListCustomers": admin.list_customers(ListCustomersRequest::default());
        "CreatePlan": admin.create_plan(CreatePlanRequest::default());
        "ListPlans": admin.list_plans(ListPlansRequest::default());
        "ArchivePlan": admin.archive_plan(ArchivePlanRequest::default());
        "CreateSubscription": admin.create_subscription(CreateSubscriptionRequest::default());
        "GetSubscription": admin.get_subscription(GetSubscriptionRequest::default());
        "GetCustomerSubscription":
            admin.get_customer_subscription(GetCustomerSubscriptionRequest::default());
        "ChangeSubscriptionPlan":
            admin.change_subscription_plan(ChangeSubscriptionPlanRequest::default());
        "CancelSubscription": admin.cancel_subscription(CancelSubscriptionRequest::default());
        "RecordPayment": admin.record_payment(RecordPaymentRequest::default());
        "GrantCredits": admin.grant_credits(GrantCreditsRequest::default());
        "AdjustCredits": admin.adjust_credits(AdjustCreditsRequest::default());
        "GetCreditBalance": admin.get_credit_balance(GetCreditBalanceRequest::default());
        "ListLedgerEntries": admin.list_ledger_entries(ListLedgerEntriesRequest::default());
        "IssueApiKey": admin.issue_api_key(IssueApiKeyRequest::default());
        "ListApiKeys": admin.list_api_keys(ListApiKeysRequest::default());
        "RevokeApiKey": admin.revoke_api_key(RevokeApiKeyRequest::default());
        "RotateApiKey": admin.rotate_api_key(RotateApiKeyRequest::default());
        "GetCustomerUsage": admin.get_customer_usage(GetCustomerUsageRequest::default());
        "ListAuditEvents": admin.list_audit_events(ListAuditEventsRequest::default());
    }
}

/// Calls every `Entitlements` RPC with an empty request. A change stream that opens and then fails counts
/// as the failure it reports.
async fn call_every_entitlements_rpc(
    entitlements: &mut EntitlementsClient,
) -> Vec<(&'static str, Result<(), Status>)> {
    let watch = match entitlements
        .watch_changes(WatchChangesRequest::default())
        .await
    {
        Ok(response) => response.into_inner().message().await.map(drop),
        Err(status) => Err(status),
    };
    let mut outcomes = outcomes! {
        "Resolve": entitlements.resolve(ResolveRequest::default());
        "ReportUsage": entitlements.report_usage(ReportUsageRequest::default());
        "GetCreditBalance": entitlements.get_credit_balance(GetCreditBalanceRequest::default());
    };
    outcomes.push(("WatchChanges", watch));
    outcomes
}
