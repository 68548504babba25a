//! Per-customer runtime statistics through the real stack: a known mix of traffic through the gateway,
//! which reports to billing (real PostgreSQL) in the background; billing's admin API then answers exactly
//! those counts for each customer, and none for a customer who sent nothing.

use std::{collections::BTreeMap, sync::Arc};

use http::{Response, StatusCode};
use integration_tests::{
    BillingInstance, body, customer_request, fresh_database, get, http_client, plan_request, send,
    spawn_billing_with_clock, spawn_gateway, spawn_upstream, spawn_usage,
};
use proto::billing::v1::{
    self as billing_pb, CreateSubscriptionRequest, GetCustomerStatsRequest, IssueApiKeyRequest,
};
use time::OffsetDateTime;
use uuid::Uuid;

struct Customer {
    id: String,
    secret: String,
}

async fn customer_on(billing: &BillingInstance, plan: billing_pb::CreatePlanRequest) -> Customer {
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
    let secret = admin
        .issue_api_key(IssueApiKeyRequest {
            customer_id: customer.id.clone(),
            name: "stats".into(),
        })
        .await
        .expect("key")
        .into_inner()
        .secret;
    Customer {
        id: customer.id,
        secret,
    }
}

fn free_plan(included_units: i64) -> billing_pb::CreatePlanRequest {
    billing_pb::CreatePlanRequest {
        price_micros: 0,
        included_units,
        ..plan_request(&format!("p{}", Uuid::new_v4().simple()))
    }
}

/// The customer's statistics over the hours around now, summed (a test may straddle an hour).
#[derive(Debug, Default, PartialEq)]
struct Totals {
    admitted: i64,
    upstream: [i64; 4],
    answered: BTreeMap<String, i64>,
    units: i64,
    credits_micros: i64,
    hours_with_latency: usize,
}

async fn totals(billing: &BillingInstance, customer_id: &str) -> Totals {
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
    let mut totals = Totals::default();
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

#[tokio::test]
async fn each_customer_gets_exactly_the_counts_of_its_own_traffic_per_hour() {
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    let billing = spawn_billing_with_clock(fresh_database().await, clock).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|request| async move {
        let mut answer = Response::new(body("ok"));
        *answer.status_mut() = match request.uri().path() {
            "/v1/broken" => StatusCode::INTERNAL_SERVER_ERROR,
            "/v1/missing" => StatusCode::NOT_FOUND,
            _ => StatusCode::OK,
        };
        answer
    })
    .await;
    let routes = format!(
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let quota_of_three = customer_on(&billing, free_plan(3)).await;
    let rate_of_one = customer_on(
        &billing,
        billing_pb::CreatePlanRequest {
            rate_limit: 1,
            rate_period_ms: 60_000,
            burst: 1,
            ..free_plan(100)
        },
    )
    .await;
    let silent = customer_on(&billing, free_plan(100)).await;
    let client = http_client();
    let bearer = |customer: &Customer| format!("Bearer {}", customer.secret);

    let mut statuses = Vec::new();
    for path in ["/v1/ok", "/v1/missing", "/v1/broken", "/v1/ok", "/v1/ok"] {
        let answer = send(
            &client,
            get(
                &gateway.url(path),
                &[("authorization", &bearer(&quota_of_three))],
            ),
        )
        .await;
        statuses.push(answer.status.as_u16());
    }
    for _ in 0..2 {
        let answer = send(
            &client,
            get(
                &gateway.url("/v1/ok"),
                &[("authorization", &bearer(&rate_of_one))],
            ),
        )
        .await;
        statuses.push(answer.status.as_u16());
    }
    statuses.push(
        send(&client, get(&gateway.url("/v1/ok"), &[]))
            .await
            .status
            .as_u16(),
    );
    gateway.shutdown().await;

    assert_eq!(statuses, [200, 404, 500, 200, 402, 200, 429, 401]);
    assert_eq!(
        totals(&billing, &quota_of_three.id).await,
        Totals {
            admitted: 4,
            upstream: [2, 1, 1, 0],
            answered: BTreeMap::from([("quota_exhausted".to_owned(), 1)]),
            units: 3,
            credits_micros: 0,
            hours_with_latency: 1,
        }
    );
    assert_eq!(
        totals(&billing, &rate_of_one.id).await,
        Totals {
            admitted: 1,
            upstream: [1, 0, 0, 0],
            answered: BTreeMap::from([("rate_limited".to_owned(), 1)]),
            units: 1,
            credits_micros: 0,
            hours_with_latency: 1,
        }
    );
    assert_eq!(totals(&billing, &silent.id).await, Totals::default());
}

#[tokio::test]
async fn a_statistics_report_sent_twice_is_counted_once() {
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    let billing = spawn_billing_with_clock(fresh_database().await, clock).await;
    let customer = customer_on(&billing, free_plan(10)).await;
    let hour = OffsetDateTime::now_utc().unix_timestamp() / 3600 * 3600;
    let report = billing_pb::ReportStatsRequest {
        report_id: "gateway-1-report-7".into(),
        rows: vec![billing_pb::CustomerHourStats {
            customer_id: customer.id.clone(),
            hour: Some(prost_types::Timestamp {
                seconds: hour,
                nanos: 0,
            }),
            admitted: 5,
            upstream_2xx: 5,
            answered: [("credits_exhausted".to_owned(), 2)].into(),
            units: 5,
            upstream_latency_sum_us: 5_000,
            upstream_latency_buckets: vec![5],
            ..Default::default()
        }],
    };
    let mut entitlements = billing.entitlements().await;

    entitlements
        .report_stats(report.clone())
        .await
        .expect("first");
    entitlements
        .report_stats(report)
        .await
        .expect("again, acknowledged");

    assert_eq!(
        totals(&billing, &customer.id).await,
        Totals {
            admitted: 5,
            upstream: [5, 0, 0, 0],
            answered: BTreeMap::from([("credits_exhausted".to_owned(), 2)]),
            units: 5,
            credits_micros: 0,
            hours_with_latency: 1,
        }
    );
}
