//! A first reading of the gateway's speed: requests per second (closed loop) straight to an upstream and
//! through the gateway (admitted and 402 paths), and latency at a fixed request rate (open loop, measured
//! from each request's scheduled start, so a stall counts against every request it delays). Everything
//! runs in this one process through the test harness — client, gateway, usage, billing, upstream — on the
//! same cores, so the figures are a floor, not the benchmark. Run it with `bench/gateway-first-reading`.

#![allow(clippy::print_stdout)] // printing figures is this program's job

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use integration_tests::{
    body, customer_request, fresh_database, http_client, plan_request, spawn_billing_with_clock,
    spawn_gateway, spawn_upstream, spawn_usage,
};
use proto::billing::v1::{self as billing_pb, CreateSubscriptionRequest, IssueApiKeyRequest};
use tokio::task::JoinSet;
use uuid::Uuid;

const CLOSED_LOOP_REQUESTS: usize = 20_000;
const CONNECTIONS: usize = 32;
const OPEN_LOOP_RATE: u64 = 500;
const OPEN_LOOP_SECONDS: u64 = 5;

#[tokio::main]
async fn main() {
    let clock = Arc::new(billing::ManualClock::new(time::OffsetDateTime::now_utc()));
    let billing = spawn_billing_with_clock(fresh_database().await, clock).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|_| async { Response::new(body("ok")) }).await;
    let routes = format!(
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let paying = key_for(&billing, 1_000_000_000).await;
    let broke = key_for(&billing, 0).await;

    let direct = format!("http://{}/v1/x", upstream.addr);
    let through = gateway.url("/v1/x");
    for url in [&direct, &through] {
        closed_loop(url, &paying, 2_000).await; // warm-up: pools, caches, script cache
    }
    closed_loop(&through, &broke, 500).await;

    let direct_rps = closed_loop(&direct, &paying, CLOSED_LOOP_REQUESTS).await;
    let admitted_rps = closed_loop(&through, &paying, CLOSED_LOOP_REQUESTS).await;
    let refused_rps = closed_loop(&through, &broke, CLOSED_LOOP_REQUESTS).await;
    let direct_latency = open_loop(&direct, &paying).await;
    let gateway_latency = open_loop(&through, &paying).await;

    println!(
        "gateway first reading, debug={} (release is what counts)",
        cfg!(debug_assertions)
    );
    println!("closed loop, {CONNECTIONS} connections, {CLOSED_LOOP_REQUESTS} requests per figure:");
    println!("  upstream directly:            {direct_rps:>9.0} requests/s");
    println!("  through the gateway, 200:     {admitted_rps:>9.0} requests/s");
    println!("  through the gateway, 402:     {refused_rps:>9.0} requests/s");
    println!(
        "open loop at {OPEN_LOOP_RATE} requests/s for {OPEN_LOOP_SECONDS} s (latency from scheduled start):"
    );
    for (name, latencies) in [
        ("upstream directly", &direct_latency),
        ("through the gateway", &gateway_latency),
    ] {
        println!(
            "  {name:<20} p50 {:>7.0} µs   p99 {:>7.0} µs   p99.9 {:>7.0} µs",
            percentile(latencies, 0.50),
            percentile(latencies, 0.99),
            percentile(latencies, 0.999)
        );
    }
    println!(
        "  added by the gateway: p50 {:.0} µs, p99 {:.0} µs",
        percentile(&gateway_latency, 0.50) - percentile(&direct_latency, 0.50),
        percentile(&gateway_latency, 0.99) - percentile(&direct_latency, 0.99)
    );
    gateway.shutdown().await;
    usage.shutdown().await;
    billing.shutdown().await;
}

/// Returns an API key of a customer on a free plan with `included_units` units.
async fn key_for(billing: &integration_tests::BillingInstance, included_units: i64) -> String {
    let mut admin = billing.admin().await;
    let plan = admin
        .create_plan(billing_pb::CreatePlanRequest {
            price_micros: 0,
            included_units,
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
    admin
        .issue_api_key(IssueApiKeyRequest {
            customer_id: customer.id,
            name: "load".into(),
        })
        .await
        .expect("key")
        .into_inner()
        .secret
}

fn request(url: &str, key: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

async fn closed_loop(url: &str, key: &str, requests: usize) -> f64 {
    let client = http_client();
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..CONNECTIONS {
        let (client, url, key) = (client.clone(), url.to_owned(), key.to_owned());
        let count = requests / CONNECTIONS + usize::from(worker < requests % CONNECTIONS);
        workers.spawn(async move {
            for _ in 0..count {
                let response = client
                    .request(request(&url, &key))
                    .await
                    .expect("an answer");
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    requests as f64 / started.elapsed().as_secs_f64()
}

/// Sends requests at a fixed rate regardless of how fast answers come, and returns each one's latency
/// in µs, measured from when it was due.
async fn open_loop(url: &str, key: &str) -> Vec<f64> {
    let client = http_client();
    let interval = Duration::from_micros(1_000_000 / OPEN_LOOP_RATE);
    let total = OPEN_LOOP_RATE * OPEN_LOOP_SECONDS;
    let start = Instant::now();
    let mut inflight = JoinSet::new();
    for index in 0..total {
        let due = start + interval * u32::try_from(index).expect("small");
        tokio::time::sleep_until(due.into()).await;
        let (client, url, key) = (client.clone(), url.to_owned(), key.to_owned());
        inflight.spawn(async move {
            let response = client
                .request(request(&url, &key))
                .await
                .expect("an answer");
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            due.elapsed().as_secs_f64() * 1e6
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    while let Some(latency) = inflight.join_next().await {
        latencies.push(latency.expect("task"));
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}
