//! Measures the usage service: admissions per second for one sequential client, for concurrent clients and
//! for batches, and the admit script's cost inside Redis (`INFO commandstats`). Starts everything it needs
//! through the test harness (throwaway PostgreSQL and Redis, billing and usage in-process). Run it with
//! `bench/usage-admit`, which builds it in release mode.

#![allow(clippy::print_stdout)] // printing figures is this program's job

use std::time::{Duration, Instant};

use integration_tests::{
    customer_request, fresh_database, plan_request, redis_connection, spawn_billing, spawn_usage,
};
use proto::{
    billing::v1::{self as billing_pb, CreateSubscriptionRequest},
    usage::v1::{AdmitBatchRequest, AdmitRequest, Decision},
};
use tokio::task::JoinSet;
use uuid::Uuid;

const SEQUENTIAL: usize = 5_000;
const CONCURRENT: usize = 50_000;
const IN_FLIGHT: usize = 64;
const BATCHES: usize = 500;
const BATCH_SIZE: usize = 100;
const BATCHES_IN_FLIGHT: usize = 4;

#[tokio::main]
async fn main() {
    let billing = spawn_billing(fresh_database().await).await;
    let usage = spawn_usage(&billing).await;
    let mut admin = billing.admin().await;
    let plan = admin
        .create_plan(billing_pb::CreatePlanRequest {
            price_micros: 0,
            included_units: 1_000_000_000,
            ..plan_request("load")
        })
        .await
        .expect("plan")
        .into_inner();
    let mut templates = Vec::new();
    for _ in 0..16 {
        let customer = admin
            .create_customer(customer_request(&Uuid::new_v4().to_string()))
            .await
            .expect("customer")
            .into_inner();
        let subscription = admin
            .create_subscription(CreateSubscriptionRequest {
                customer_id: customer.id.clone(),
                plan_id: plan.id.clone(),
            })
            .await
            .expect("subscription")
            .into_inner();
        templates.push(AdmitRequest {
            request_id: String::new(),
            customer_id: customer.id,
            subscription_id: subscription.id,
            units: 1,
            limits: Some(billing_pb::Limits {
                included_units: plan.included_units,
                overage_mode: billing_pb::OverageMode::Block.into(),
                ..Default::default()
            }),
            period_start: subscription.current_period_start,
            period_end: subscription.current_period_end,
        });
    }
    let request = |index: usize| AdmitRequest {
        request_id: format!("load-{index}"),
        ..templates[index % templates.len()].clone()
    };
    let client = usage.client().await;
    let mut redis = redis_connection().await;

    // Warm-up: connections, script cache, allocator.
    let mut warm = client.clone();
    for index in 0..500 {
        warm.admit(request(usize::MAX / 2 + index))
            .await
            .expect("admit");
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await
        .expect("resetstat");

    let mut sequential = client.clone();
    let started = Instant::now();
    for index in 0..SEQUENTIAL {
        let answer = sequential
            .admit(request(index))
            .await
            .expect("admit")
            .into_inner();
        assert_eq!(answer.decision(), Decision::Admitted);
    }
    let sequential_rate = rate(SEQUENTIAL, started.elapsed());
    let script_cost = script_usec_per_call(&mut redis).await;

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..IN_FLIGHT {
        let mut client = client.clone();
        let requests: Vec<AdmitRequest> = (worker..CONCURRENT)
            .step_by(IN_FLIGHT)
            .map(|index| request(SEQUENTIAL + index))
            .collect();
        tasks.spawn(async move {
            for request in requests {
                client.admit(request).await.expect("admit");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let concurrent_rate = rate(CONCURRENT, started.elapsed());

    let offset = SEQUENTIAL + CONCURRENT;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for worker in 0..BATCHES_IN_FLIGHT {
        let mut client = client.clone();
        let batches: Vec<Vec<AdmitRequest>> = (worker..BATCHES)
            .step_by(BATCHES_IN_FLIGHT)
            .map(|batch| {
                (0..BATCH_SIZE)
                    .map(|item| request(offset + batch * BATCH_SIZE + item))
                    .collect()
            })
            .collect();
        tasks.spawn(async move {
            for requests in batches {
                let answers = client
                    .admit_batch(AdmitBatchRequest { requests })
                    .await
                    .expect("batch")
                    .into_inner();
                assert!(
                    answers
                        .decisions
                        .iter()
                        .all(|answer| answer.decision() == Decision::Admitted)
                );
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let batch_rate = rate(BATCHES * BATCH_SIZE, started.elapsed());

    println!(
        "usage admission, debug={} (release is what counts)",
        cfg!(debug_assertions)
    );
    println!(
        "  one client, sequential Admit:          {sequential_rate:>9.0} admissions/s ({SEQUENTIAL} calls)"
    );
    println!(
        "  {IN_FLIGHT} in flight, Admit:                  {concurrent_rate:>9.0} admissions/s ({CONCURRENT} calls)"
    );
    println!(
        "  AdmitBatch of {BATCH_SIZE}, {BATCHES_IN_FLIGHT} in flight:          {batch_rate:>9.0} admissions/s ({} requests)",
        BATCHES * BATCH_SIZE
    );
    println!(
        "  admit script inside Redis (evalsha):   {script_cost:>9.2} µs/call (INFO commandstats, sequential run)"
    );
    usage.shutdown().await;
    billing.shutdown().await;
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

async fn script_usec_per_call(redis: &mut redis::aio::ConnectionManager) -> f64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("info");
    stats
        .lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"))
        .and_then(|line| {
            line.split(',')
                .find_map(|field| field.strip_prefix("usec_per_call="))
        })
        .and_then(|value| value.parse().ok())
        .unwrap_or(f64::NAN)
}
