//! Metrics and per-customer statistics through the real stack: a known mix of traffic, then `/metrics` read
//! over HTTP and billing's statistics per customer; and the Grafana dashboard checked against what the
//! services export.
//!
//! The three services run in this one test process and share its `metrics` recorder, which is why every
//! metric name carries its service. Each test file is its own process under nextest and `cargo test`, and
//! this file has one test that counts, so no other traffic reaches these counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use http::{Response, StatusCode};
use integration_tests::{
    KeyedCustomer, body, free_plan, fresh_database, get, http_client, keyed_customer, plan_request,
    send, spawn_billing_with_clock, spawn_gateway, spawn_upstream, spawn_usage, stats_totals,
};
use proto::billing::v1::{self as billing_pb, CancelSubscriptionRequest, OverageMode};
use time::OffsetDateTime;
use uuid::Uuid;

async fn serve_metrics() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a metrics port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(telemetry::serve_metrics(
        listener,
        telemetry::metrics(),
        std::future::pending(),
    ));
    addr
}

/// Returns every sample of `/metrics`: `name{labels}` (labels sorted, as the exporter writes them) → value.
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let answer = send(&http_client(), get(&format!("http://{addr}/metrics"), &[])).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = String::from_utf8(answer.body.to_vec()).expect("UTF-8");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn total(samples: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(label, value)| rest.contains(&format!("{label}=\"{value}\"")))
        })
        .map(|(_, value)| value)
        .sum()
}

#[tokio::test]
async fn metrics_and_customer_statistics_count_exactly_the_traffic_sent_and_the_dashboard_queries_only_exported_metrics()
 {
    let metrics_addr = serve_metrics().await;
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    let billing = spawn_billing_with_clock(fresh_database().await, clock).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|request| async move {
        let mut answer = Response::new(body("ok"));
        if request.uri().path() == "/v1/broken" {
            *answer.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        answer
    })
    .await;
    let routes = format!(
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let roomy = keyed_customer(&billing, Some(free_plan(100))).await;
    let no_subscription = keyed_customer(&billing, None).await;
    let cancelled = keyed_customer(&billing, Some(free_plan(100))).await;
    billing
        .admin()
        .await
        .cancel_subscription(CancelSubscriptionRequest {
            subscription_id: cancelled.subscription_id.clone().expect("subscribed"),
            at_period_end: false,
        })
        .await
        .expect("cancel");
    let past_due = keyed_customer(
        &billing,
        Some(billing_pb::CreatePlanRequest {
            grace_period_seconds: 0,
            ..plan_request(&format!("p{}", Uuid::new_v4().simple()))
        }),
    )
    .await;
    let no_quota = keyed_customer(&billing, Some(free_plan(0))).await;
    let no_credits = keyed_customer(
        &billing,
        Some(billing_pb::CreatePlanRequest {
            overage_mode: OverageMode::Credits.into(),
            unit_price_micros: 1_000,
            ..free_plan(0)
        }),
    )
    .await;
    let rate_limited = keyed_customer(
        &billing,
        Some(billing_pb::CreatePlanRequest {
            rate_limit: 1,
            rate_period_ms: 60_000,
            burst: 1,
            ..free_plan(100)
        }),
    )
    .await;
    let client = http_client();
    let call = |path: &str, key: Option<&str>| {
        let headers: Vec<(&str, String)> = key
            .map(|key| vec![("authorization", format!("Bearer {key}"))])
            .unwrap_or_default();
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        send(&client, get(&gateway.url(path), &headers))
    };
    let unknown_key = proto::api_key::assemble(&"7".repeat(33));

    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(call("/v1/ok", Some(&roomy.secret)).await.status);
    }
    statuses.push(call("/v1/broken", Some(&roomy.secret)).await.status);
    statuses.push(call("/v1/ok", None).await.status);
    statuses.push(call("/v1/ok", Some(&unknown_key)).await.status);
    statuses.push(call("/v1/ok", Some(&no_subscription.secret)).await.status);
    statuses.push(call("/v1/ok", Some(&cancelled.secret)).await.status);
    statuses.push(call("/v1/ok", Some(&past_due.secret)).await.status);
    statuses.push(call("/v1/ok", Some(&no_quota.secret)).await.status);
    statuses.push(call("/v1/ok", Some(&no_credits.secret)).await.status);
    statuses.push(call("/v1/ok", Some(&rate_limited.secret)).await.status);
    statuses.push(call("/v1/ok", Some(&rate_limited.secret)).await.status);
    let samples = scrape(metrics_addr).await;
    gateway.shutdown().await; // its last customer statistics go to billing

    let codes: Vec<u16> = statuses.iter().map(StatusCode::as_u16).collect();
    assert_eq!(
        codes,
        [
            200, 200, 200, 500, 401, 401, 402, 402, 402, 402, 402, 200, 429
        ]
    );
    let requests = |code: &str, status: &str| {
        total(
            &samples,
            "paygate_gateway_requests_total",
            &[("route", "/v1"), ("code", code), ("status", status)],
        )
    };
    assert_eq!(requests("forwarded", "200"), 4.0);
    assert_eq!(requests("forwarded", "500"), 1.0);
    for (code, status) in [
        ("missing_api_key", "401"),
        ("invalid_api_key", "401"),
        ("subscription_required", "402"),
        ("subscription_inactive", "402"),
        ("payment_past_due", "402"),
        ("quota_exhausted", "402"),
        ("credits_exhausted", "402"),
        ("rate_limited", "429"),
    ] {
        assert_eq!(requests(code, status), 1.0, "{code}");
    }
    assert_eq!(total(&samples, "paygate_gateway_requests_total", &[]), 13.0);
    assert_eq!(
        total(
            &samples,
            "paygate_gateway_request_duration_seconds_count",
            &[("route", "/v1")]
        ),
        13.0
    );
    assert_eq!(
        total(
            &samples,
            "paygate_gateway_upstream_duration_seconds_count",
            &[]
        ),
        5.0
    );
    let admissions = |outcome: &str| {
        total(
            &samples,
            "paygate_usage_admissions_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(admissions("admitted"), 5.0);
    assert_eq!(admissions("quota_exhausted"), 1.0);
    assert_eq!(admissions("credits_exhausted"), 1.0);
    assert_eq!(admissions("rate_limited"), 1.0);
    assert_eq!(admissions("error"), 0.0);
    let resolves = |status: &str| {
        total(
            &samples,
            "paygate_billing_rpcs_total",
            &[("method", "Resolve"), ("status", status)],
        )
    };
    assert_eq!(
        resolves("Ok"),
        7.0,
        "one resolve per known key, then the cache"
    );
    assert_eq!(resolves("NotFound"), 1.0);

    let stats = |customer: &KeyedCustomer| {
        let customer_id = customer.id.clone();
        let billing = &billing;
        async move {
            let totals = stats_totals(billing, &customer_id).await;
            // admitted, upstream 2xx, upstream 5xx, units
            let figures = [
                totals.admitted,
                totals.upstream[0],
                totals.upstream[2],
                totals.units,
            ];
            (figures, totals.answered)
        }
    };
    let only = |code: &str| BTreeMap::from([(code.to_owned(), 1_i64)]);
    assert_eq!(stats(&roomy).await, ([4, 3, 1, 3], BTreeMap::new()));
    assert_eq!(
        stats(&rate_limited).await,
        ([1, 1, 0, 1], only("rate_limited"))
    );
    for (customer, code) in [
        (&no_subscription, "subscription_required"),
        (&cancelled, "subscription_inactive"),
        (&past_due, "payment_past_due"),
        (&no_quota, "quota_exhausted"),
        (&no_credits, "credits_exhausted"),
    ] {
        assert_eq!(stats(customer).await, ([0, 0, 0, 0], only(code)), "{code}");
    }
    let quiet = keyed_customer(&billing, Some(free_plan(100))).await;
    assert_eq!(stats(&quiet).await, ([0, 0, 0, 0], BTreeMap::new()));

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/observability/grafana/dashboards/paygate.json"
        ))
        .expect("the dashboard file"),
    )
    .expect("the dashboard is JSON");
    let exported: BTreeSet<&str> = samples
        .keys()
        .map(|series| {
            series
                .split_once('{')
                .map_or(series.as_str(), |(name, _)| name)
        })
        .collect();
    let queried = queried_metrics(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which no service exports"
    );
}

/// Returns every `paygate_*` metric name in the dashboard's queries.
fn queried_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("every target has a PromQL expr");
            let mut rest = expr;
            while let Some(start) = rest.find("paygate_") {
                let tail = &rest[start..];
                let end = tail
                    .find(|character: char| {
                        !(character.is_ascii_alphanumeric() || character == '_')
                    })
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    names
}
