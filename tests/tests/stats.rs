//! Per-customer runtime statistics through the real stack: a known mix of traffic through the gateway,
//! which reports to billing (real PostgreSQL) in the background; billing's admin API then answers exactly
//! those counts for each customer, and none for a customer who sent nothing.

use std::{collections::BTreeMap, sync::Arc};

use http::{Response, StatusCode};
use integration_tests::{
    KeyedCustomer, StatsTotals, body, free_plan, fresh_database, get, http_client, keyed_customer,
    send, spawn_billing_with_clock, spawn_gateway, spawn_upstream, spawn_usage, stats_totals,
};
use proto::billing::v1 as billing_pb;
use time::OffsetDateTime;

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
    let quota_of_three = keyed_customer(&billing, Some(free_plan(3))).await;
    let rate_of_one = keyed_customer(
        &billing,
        Some(billing_pb::CreatePlanRequest {
            rate_limit: 1,
            rate_period_ms: 60_000,
            burst: 1,
            ..free_plan(100)
        }),
    )
    .await;
    let silent = keyed_customer(&billing, Some(free_plan(100))).await;
    let client = http_client();
    let bearer = |customer: &KeyedCustomer| format!("Bearer {}", customer.secret);

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
        stats_totals(&billing, &quota_of_three.id).await,
        StatsTotals {
            admitted: 4,
            upstream: [2, 1, 1, 0],
            answered: BTreeMap::from([("quota_exhausted".to_owned(), 1)]),
            units: 3,
            credits_micros: 0,
            hours_with_latency: 1,
        }
    );
    assert_eq!(
        stats_totals(&billing, &rate_of_one.id).await,
        StatsTotals {
            admitted: 1,
            upstream: [1, 0, 0, 0],
            answered: BTreeMap::from([("rate_limited".to_owned(), 1)]),
            units: 1,
            credits_micros: 0,
            hours_with_latency: 1,
        }
    );
    assert_eq!(
        stats_totals(&billing, &silent.id).await,
        StatsTotals::default()
    );
}

#[tokio::test]
async fn a_statistics_report_sent_twice_is_counted_once() {
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    let billing = spawn_billing_with_clock(fresh_database().await, clock).await;
    let customer = keyed_customer(&billing, Some(free_plan(10))).await;
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
        stats_totals(&billing, &customer.id).await,
        StatsTotals {
            admitted: 5,
            upstream: [5, 0, 0, 0],
            answered: BTreeMap::from([("credits_exhausted".to_owned(), 2)]),
            units: 5,
            credits_micros: 0,
            hours_with_latency: 1,
        }
    );
}
