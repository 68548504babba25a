//! The fault benchmark (run it with `bench/faults`): paygate's gateway, usage and billing as separate
//! processes against a PostgreSQL and a Redis of its own, all on loopback. Under steady load it kills
//! (SIGKILL) usage, billing, Redis and PostgreSQL in turn and starts each again, and times what clients
//! see: the first 503, the 503s while the breaker is open, the first 2xx after the dependency returns, and
//! whether every 2xx was charged exactly once. It also measures a slow-client attack (normal clients' p99
//! with and without connections that send their head a byte a second, and how soon those are closed) and
//! billing's `Resolve` under a storm of distinct keys. It prints one table, writes the figures as JSON, and
//! exits non-zero only when a request was lost or charged without a 2xx, never because of a speed figure,
//! or when a killed dependency cannot start again because another process took its port meanwhile (the
//! rest of the stack points at that port, so the experiment cannot go on without it).

#![allow(clippy::print_stdout)] // printing figures is this program's job

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use integration_tests::bench::{
    Admin, Postgres, Redis, RunningService, ServiceSpec, StartError, Usage, admin_client,
    billing_spec, entitlements_client, free_plan, gateway_spec, key_with_quota, keys_of, many_keys,
    percentile, restart_within, subscribed_customer, usage_client, usage_of, usage_spec,
};
use proto::billing::v1::{self as billing_pb, GetCustomerUsageRequest};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Semaphore, watch},
    task::JoinSet,
};

/// Targets printed beside the figures (issue 11).
const RECOVERY_TARGET_MS: f64 = 1_000.0;
const OPEN_503_P99_TARGET_MS: f64 = 5.0;
const RESOLVE_P999_TARGET_MS: f64 = 20.0;
/// The most any one request of the benchmark's clients may take before it counts as unanswered.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// Requests of one load stream in flight at once; beyond, a due request is skipped (and counted).
const MAX_IN_FLIGHT: usize = 512;
/// How long usage and billing may take to agree on the spending after a scenario.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// How long a killed dependency may take to start again.
const RESTART_LIMIT: Duration = Duration::from_secs(60);

/// What to run, and how big.
#[derive(Parser)]
#[command(about = "paygate under killed dependencies and hostile clients (see bench/README.md)")]
struct Args {
    /// Directory holding the `billing`, `usage` and `gateway` binaries.
    #[arg(long)]
    bin_dir: PathBuf,
    /// Directory the JSON results are written to.
    #[arg(long, default_value = "bench/results")]
    results: PathBuf,
    /// A label for the results file.
    #[arg(long, default_value = "faults")]
    label: String,
    /// Requests/s of the steady load with one (warm) key.
    #[arg(long, default_value_t = 400)]
    warm_rate: u64,
    /// Requests/s of the steady load where every request has a key never used before.
    #[arg(long, default_value_t = 100)]
    cold_rate: u64,
    /// Seconds of steady load before the kill.
    #[arg(long, default_value_t = 2.0)]
    steady_seconds: f64,
    /// Seconds the dependency stays dead.
    #[arg(long, default_value_t = 3.0)]
    outage_seconds: f64,
    /// Seconds to wait for the first 2xx after the dependency returns.
    #[arg(long, default_value_t = 20.0)]
    recovery_limit_seconds: f64,
    /// Slow connections of the slow-client attack.
    #[arg(long, default_value_t = 500)]
    slow_connections: usize,
    /// Seconds of normal load measured without, then with, the slow connections.
    #[arg(long, default_value_t = 10.0)]
    slow_seconds: f64,
    /// Seconds (from its opening) to wait for the gateway to close each slow connection.
    #[arg(long, default_value_t = 30.0)]
    close_limit_seconds: f64,
    /// Distinct keys of the `Resolve` storm.
    #[arg(long, default_value_t = 100_000)]
    storm_keys: usize,
    /// `Resolve` calls per second of the storm (about the cold pass's rate in `bench/run`).
    #[arg(long, default_value_t = 3_000)]
    storm_rate: u64,
    /// The gateway's deadline for billing and usage calls, in ms (`GATEWAY_BACKEND_DEADLINE_MS`).
    #[arg(long, default_value_t = 250)]
    backend_deadline_ms: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let work = integration_tests::bench::work_dir("paygate-faults");
    let report = run(&args, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let report = report.unwrap_or_else(|error| {
        eprintln!("paygate-faults: {error}; the experiment needs that port, so it stops here");
        std::process::exit(1);
    });
    let file = integration_tests::bench::write_results(&args.results, &args.label, &report);
    println!("\nfigures written to {}", file.display());
    if report["miscounted_requests"].as_u64() != Some(0) {
        eprintln!("paygate-faults: a request was lost or charged without a 2xx answer");
        std::process::exit(1);
    }
}

/// Runs the benchmark; fails only when a dependency cannot start again because its port was taken.
async fn run(args: &Args, work: &Path) -> Result<Value, StartError> {
    println!("starting PostgreSQL, Redis, an upstream, billing, usage and the gateway…");
    let mut stack = Stack::start(args, work).await;
    let admin = admin_client(stack.billing.port).await;
    let usage = usage_client(stack.usage.port).await;
    let client = integration_tests::http_client();
    let url = format!("http://127.0.0.1:{}/v1/faults", stack.gateway.port);

    println!("issuing {} keys for the Resolve storm…", args.storm_keys);
    let started = Instant::now();
    let storm_keys = many_keys(&admin, args.storm_keys).await;
    println!("  issued in {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "Resolve storm: {} distinct keys at {}/s straight to billing…",
        storm_keys.len(),
        args.storm_rate
    );
    let storm = resolve_storm(&stack, &storm_keys, args.storm_rate).await;
    drop(storm_keys);

    println!(
        "slow-client attack: {} connections sending their head a byte a second…",
        args.slow_connections
    );
    let (slow_key, _) = key_with_quota(&admin, "faults-slow", 1_000_000_000_000).await;
    let slow = slow_client_attack(args, &client, &url, &slow_key, stack.gateway.port).await;

    let mut scenarios = Vec::new();
    for dependency in Dependency::ALL {
        println!("kill -9 of {} under steady load…", dependency.name());
        let scenario =
            fault_scenario(args, &mut stack, dependency, &admin, &usage, &client, &url).await?;
        scenarios.push(scenario);
    }

    let report = Report {
        args,
        scenarios,
        slow,
        storm,
    };
    report.print();
    Ok(report.to_json())
}

// ----- the stack -----

/// Everything the benchmark runs; killed and restarted one dependency at a time.
struct Stack {
    postgres: Postgres,
    redis: Redis,
    billing: RunningService,
    billing_spec: ServiceSpec,
    usage: RunningService,
    usage_spec: ServiceSpec,
    gateway: RunningService,
    _upstream: integration_tests::Upstream,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dependency {
    Usage,
    Billing,
    Redis,
    Postgres,
}

impl Dependency {
    const ALL: [Self; 4] = [Self::Usage, Self::Billing, Self::Redis, Self::Postgres];

    fn name(self) -> &'static str {
        match self {
            Self::Usage => "usage",
            Self::Billing => "billing",
            Self::Redis => "Redis",
            Self::Postgres => "PostgreSQL",
        }
    }
}

impl Stack {
    async fn start(args: &Args, work: &Path) -> Self {
        // Logged so the storm's stalls can be matched with what PostgreSQL was doing at the time.
        let postgres = Postgres::start(
            work,
            &[
                "log_checkpoints=on",
                "log_autovacuum_min_duration=0",
                "log_lock_waits=on",
                "deadlock_timeout=20ms",
                "log_min_duration_statement=20",
                "log_line_prefix=%m [%p] ",
                "log_timezone=UTC",
            ],
        )
        .await;
        let redis = Redis::start(work).await;
        let upstream = integration_tests::spawn_ok_upstream().await;
        let billing_spec = billing_spec(&args.bin_dir, &postgres.url());
        let billing = billing_spec.start().await;
        let usage_spec = usage_spec(&args.bin_dir, &redis.url(), billing.port);
        let usage = usage_spec.start().await;
        let gateway = gateway_spec(
            &args.bin_dir,
            work,
            &upstream.addr.to_string(),
            args.backend_deadline_ms,
            billing.port,
            usage.port,
        )
        .start()
        .await;
        Self {
            postgres,
            redis,
            billing,
            billing_spec,
            usage,
            usage_spec,
            gateway,
            _upstream: upstream,
        }
    }

    fn kill(&mut self, dependency: Dependency) {
        match dependency {
            Dependency::Usage => self.usage.process.kill_hard(),
            Dependency::Billing => self.billing.process.kill_hard(),
            Dependency::Redis => self.redis.kill_hard(),
            Dependency::Postgres => self.postgres.kill_hard(),
        }
    }

    /// Starts `dependency` again on its old port and returns once it answers.
    async fn restart(&mut self, dependency: Dependency) -> Result<(), StartError> {
        match dependency {
            Dependency::Usage => {
                let (spec, port) = (&self.usage_spec, self.usage.port);
                self.usage.process = restart_within(RESTART_LIMIT, || spec.start_on(port)).await?;
            }
            Dependency::Billing => {
                let (spec, port) = (&self.billing_spec, self.billing.port);
                self.billing.process =
                    restart_within(RESTART_LIMIT, || spec.start_on(port)).await?;
            }
            Dependency::Redis => self.redis.restart(RESTART_LIMIT).await?,
            Dependency::Postgres => self.postgres.restart(RESTART_LIMIT).await?,
        }
        Ok(())
    }
}

// ----- steady load -----

/// One request of a load stream: when it was sent and answered (since the stream's epoch) and its status
/// (0: no answer within `REQUEST_LIMIT`, or the connection failed).
#[derive(Clone, Copy)]
struct Sample {
    sent: Duration,
    latency: Duration,
    status: u16,
}

impl Sample {
    fn answered(&self) -> Duration {
        self.sent + self.latency
    }
}

/// Which keys a stream sends.
enum Keys {
    /// The same key every time (cached in the gateway after the first request).
    One(String),
    /// Each key once, in order; the stream ends when they run out.
    EachOnce(Vec<String>),
}

/// A load stream running in the background.
struct Stream {
    stop: watch::Sender<bool>,
    /// The latest moment (µs since the epoch) a 2xx was answered.
    last_ok_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<(Vec<Sample>, u64)>,
}

impl Stream {
    /// Sends GETs of `url` at `rate` per second from `epoch` on (open loop: a slow answer does not delay
    /// the next request), until stopped.
    fn start(
        client: &Client<HttpConnector, Full<Bytes>>,
        url: &str,
        keys: Keys,
        rate: u64,
        epoch: Instant,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let last_ok_us = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(send_at_rate(
            client.clone(),
            url.to_owned(),
            keys,
            rate,
            epoch,
            stopped,
            last_ok_us.clone(),
        ));
        Self {
            stop,
            last_ok_us,
            task,
        }
    }

    fn ok_since(&self, instant: Duration) -> bool {
        self.last_ok_us.load(Ordering::Relaxed) >= instant.as_micros() as u64
    }

    /// Stops sending, waits for the answers in flight, and returns every sample and the count of requests
    /// skipped because too many were in flight.
    async fn finish(self) -> (Vec<Sample>, u64) {
        let _ = self.stop.send(true);
        self.task.await.expect("a load stream")
    }
}

async fn send_at_rate(
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    keys: Keys,
    rate: u64,
    epoch: Instant,
    mut stopped: watch::Receiver<bool>,
    last_ok_us: Arc<AtomicU64>,
) -> (Vec<Sample>, u64) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut requests = JoinSet::new();
    let mut samples = Vec::new();
    let mut skipped = 0;
    let mut next_key = 0;
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = tick.tick() => {}
            Some(done) = requests.join_next(), if !requests.is_empty() => {
                samples.push(done.expect("a request task"));
                continue;
            }
        }
        let key = match &keys {
            Keys::One(key) => key.clone(),
            Keys::EachOnce(keys) => match keys.get(next_key) {
                Some(key) => key.clone(),
                None => break,
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        next_key += 1;
        let (client, url, last_ok_us) = (client.clone(), url.clone(), last_ok_us.clone());
        requests.spawn(async move {
            let _permit = permit;
            let sent = epoch.elapsed();
            let status = send_once(&client, &url, &key).await;
            let answered = epoch.elapsed();
            if (200..300).contains(&status) {
                last_ok_us.fetch_max(answered.as_micros() as u64, Ordering::Relaxed);
            }
            Sample {
                sent,
                latency: answered - sent,
                status,
            }
        });
    }
    while let Some(done) = requests.join_next().await {
        samples.push(done.expect("a request task"));
    }
    samples.sort_by_key(|sample| sample.sent);
    (samples, skipped)
}

/// Sends one GET with `key`; returns the status, or 0 when no whole answer came within `REQUEST_LIMIT`.
async fn send_once(client: &Client<HttpConnector, Full<Bytes>>, url: &str, key: &str) -> u16 {
    let request = http::Request::get(url)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let exchange = async {
        let answer = client.request(request).await.ok()?;
        let status = answer.status().as_u16();
        answer.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(REQUEST_LIMIT, exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Sends `key` until it is answered 2xx (the gateway has then cached its entitlement); bounded. The one
/// 2xx is charged like any other.
async fn warm_up(client: &Client<HttpConnector, Full<Bytes>>, url: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(200..300).contains(&send_once(client, url, key).await) {
        assert!(
            Instant::now() < deadline,
            "the gateway answered no 2xx for 30 s before a scenario"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Latency percentiles in ms of `samples`.
fn latency_ms(samples: &[&Sample]) -> Value {
    let mut latencies: Vec<f64> = samples
        .iter()
        .map(|sample| millis(sample.latency))
        .collect();
    latencies.sort_by(f64::total_cmp);
    json!({
        "count": latencies.len(),
        "p50": percentile(&latencies, 0.50),
        "p99": percentile(&latencies, 0.99),
        "max": latencies.last().copied().unwrap_or(f64::NAN),
    })
}

fn status_counts(samples: &[Sample]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for sample in samples {
        let name = match sample.status {
            0 => "no answer".to_owned(),
            status => status.to_string(),
        };
        *counts.entry(name).or_default() += 1;
    }
    counts
}

// ----- fault scenarios -----

/// A customer whose every 2xx must be charged exactly once.
struct Account {
    subscription: billing_pb::Subscription,
    keys: Keys,
}

const WARM_STREAM: &str = "one warm key";

/// What one stream saw in one scenario.
struct StreamFigures {
    name: &'static str,
    samples: Vec<Sample>,
    skipped: u64,
    /// 2xx answers to the same customer before the stream started (the warm-up).
    ok_before: u64,
    usage_units: Option<i64>,
    billing_units: Option<i64>,
}

struct Scenario {
    dependency: Dependency,
    kill_at: Duration,
    returned_at: Option<Duration>,
    restart_error: Option<String>,
    restart_ms: f64,
    streams: Vec<StreamFigures>,
}

/// Kills `dependency` under steady load and starts it again; fails only when it cannot start again because
/// another process took its port meanwhile.
async fn fault_scenario(
    args: &Args,
    stack: &mut Stack,
    dependency: Dependency,
    admin: &Admin,
    usage: &Usage,
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<Scenario, StartError> {
    let code = format!("faults-{}", dependency.name().to_lowercase());
    let (warm_key, warm_subscription) =
        key_with_quota(admin, &format!("{code}-warm"), 1_000_000_000_000).await;
    let cold_plan = free_plan(admin, &format!("{code}-cold"), 1_000_000_000_000).await;
    let cold_subscription = subscribed_customer(admin, &cold_plan).await;
    let cold_seconds =
        args.steady_seconds + args.outage_seconds + args.recovery_limit_seconds + 5.0;
    let cold_keys = keys_of(
        admin,
        &cold_subscription.customer_id,
        (args.cold_rate as f64 * cold_seconds).ceil() as usize,
    )
    .await;
    warm_up(client, url, &warm_key).await;
    let accounts = [
        (
            WARM_STREAM,
            args.warm_rate,
            Account {
                subscription: warm_subscription,
                keys: Keys::One(warm_key),
            },
        ),
        (
            "a new key each",
            args.cold_rate,
            Account {
                subscription: cold_subscription,
                keys: Keys::EachOnce(cold_keys),
            },
        ),
    ];

    let epoch = Instant::now();
    let mut running = Vec::new();
    let mut subscriptions = Vec::new();
    for (name, rate, account) in accounts {
        running.push((name, Stream::start(client, url, account.keys, rate, epoch)));
        subscriptions.push(account.subscription);
    }
    tokio::time::sleep(Duration::from_secs_f64(args.steady_seconds)).await;
    let kill_at = epoch.elapsed();
    stack.kill(dependency);
    tokio::time::sleep(Duration::from_secs_f64(args.outage_seconds)).await;
    let restarting = Instant::now();
    let restarted = match stack.restart(dependency).await {
        Err(taken @ StartError::PortTaken { .. }) => return Err(taken),
        restarted => restarted.map_err(|error| error.to_string()),
    };
    let restart_ms = millis(restarting.elapsed());
    let returned_at = restarted.is_ok().then(|| epoch.elapsed());
    if let Some(returned_at) = returned_at {
        let limit = Instant::now() + Duration::from_secs_f64(args.recovery_limit_seconds);
        while !running
            .iter()
            .all(|(_, stream)| stream.ok_since(returned_at))
            && Instant::now() < limit
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A second of traffic after recovery, so a relapse would show.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut streams = Vec::new();
    for ((name, stream), subscription) in running.into_iter().zip(&subscriptions) {
        let (samples, skipped) = stream.finish().await;
        let mut figures = StreamFigures {
            name,
            samples,
            skipped,
            ok_before: u64::from(name == WARM_STREAM),
            usage_units: None,
            billing_units: None,
        };
        (figures.usage_units, figures.billing_units) =
            settled_units(admin, usage, subscription, figures.ok()).await;
        streams.push(figures);
    }
    Ok(Scenario {
        dependency,
        kill_at,
        returned_at,
        restart_error: restarted.err(),
        restart_ms,
        streams,
    })
}

/// Waits until usage has reported everything it counted for `subscription` and billing has recorded it
/// (or `SETTLE_LIMIT` passes); returns usage's and billing's units (`None`: no answer).
async fn settled_units(
    admin: &Admin,
    usage: &Usage,
    subscription: &billing_pb::Subscription,
    expected: i64,
) -> (Option<i64>, Option<i64>) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let counted = usage_of(usage, subscription).await;
        let billed = billed_units(admin, subscription).await;
        let settled = matches!(
            (&counted, billed),
            (Some(counted), Some(billed))
                if counted.unreported_units == 0 && counted.units_used == billed && billed == expected
        );
        if settled || Instant::now() > deadline {
            return (counted.map(|counted| counted.units_used), billed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the units billing has recorded for the subscription's current period.
async fn billed_units(admin: &Admin, subscription: &billing_pb::Subscription) -> Option<i64> {
    let mut request = tonic::Request::new(GetCustomerUsageRequest {
        customer_id: subscription.customer_id.clone(),
        max_periods: 0,
    });
    request.set_timeout(Duration::from_secs(5));
    let periods = admin.clone().get_customer_usage(request).await.ok()?;
    Some(
        periods
            .into_inner()
            .periods
            .iter()
            // Usage keeps period starts in ms, the subscription in ns; a scenario stays in one period.
            .filter(|period| period.subscription_id == subscription.id)
            .map(|period| period.units)
            .sum(),
    )
}

impl StreamFigures {
    /// Every 2xx the customer got, the warm-up's included.
    fn ok(&self) -> i64 {
        (self
            .samples
            .iter()
            .filter(|sample| (200..300).contains(&sample.status))
            .count() as u64
            + self.ok_before) as i64
    }

    /// 2xx answers billing did not charge.
    fn lost(&self) -> i64 {
        self.billing_units
            .map_or(self.ok(), |billed| (self.ok() - billed).max(0))
    }

    /// Units billing charged beyond the 2xx answers: an error answer charged, or a request counted twice.
    fn overcharged(&self) -> i64 {
        self.billing_units
            .map_or(0, |billed| (billed - self.ok()).max(0))
    }

    fn first_503_after(&self, instant: Duration) -> Option<f64> {
        self.samples
            .iter()
            .filter(|sample| sample.status == 503 && sample.answered() >= instant)
            .map(|sample| millis(sample.answered() - instant))
            .min_by(f64::total_cmp)
    }

    fn first_ok_after(&self, instant: Duration) -> Option<f64> {
        self.samples
            .iter()
            .filter(|sample| (200..300).contains(&sample.status) && sample.answered() >= instant)
            .map(|sample| millis(sample.answered() - instant))
            .min_by(f64::total_cmp)
    }

    fn answered_between(&self, from: Duration, to: Duration) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|sample| sample.answered() >= from && sample.answered() < to)
            .collect()
    }
}

impl Scenario {
    /// The end of the outage as clients could see it: the dependency's return, or the last answer.
    fn outage_end(&self) -> Duration {
        self.returned_at.unwrap_or(Duration::MAX)
    }

    fn stream_json(&self, stream: &StreamFigures) -> Value {
        let outage = stream.answered_between(self.kill_at, self.outage_end());
        let open_503: Vec<&Sample> = outage
            .iter()
            .copied()
            .filter(|sample| sample.status == 503)
            .collect();
        json!({
            "stream": stream.name,
            "requests": stream.samples.len(),
            "skipped_in_flight_limit": stream.skipped,
            "statuses": status_counts(&stream.samples),
            "first_503_after_kill_ms": stream.first_503_after(self.kill_at),
            "open_503_latency_ms": latency_ms(&open_503),
            "ok_during_outage": outage.iter().filter(|sample| (200..300).contains(&sample.status)).count(),
            "first_2xx_after_return_ms": self.returned_at.and_then(|at| stream.first_ok_after(at)),
            "ok_seen_by_client": stream.ok(),
            "units_counted_by_usage": stream.usage_units,
            "units_charged_by_billing": stream.billing_units,
            "lost": stream.lost(),
            "charged_without_2xx": stream.overcharged(),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "dependency": self.dependency.name(),
            "kill_at_s": self.kill_at.as_secs_f64(),
            "returned_at_s": self.returned_at.map(|at| at.as_secs_f64()),
            "restart_ms": self.restart_ms,
            "restart_error": self.restart_error,
            "streams": self.streams.iter().map(|stream| self.stream_json(stream)).collect::<Vec<_>>(),
        })
    }
}

// ----- slow clients -----

struct SlowFigures {
    without: Value,
    with: Value,
    opened: usize,
    close_times_ms: Vec<f64>,
    close_limit_s: f64,
}

/// Measures normal clients' latency without and with `slow_connections` connections that send a request
/// head one byte a second, and how soon the gateway closes those.
async fn slow_client_attack(
    args: &Args,
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    key: &str,
    port: u16,
) -> SlowFigures {
    warm_up(client, url, key).await;
    let normal = |epoch| {
        Stream::start(
            client,
            url,
            Keys::One(key.to_owned()),
            args.warm_rate,
            epoch,
        )
    };
    let seconds = Duration::from_secs_f64(args.slow_seconds);

    let stream = normal(Instant::now());
    tokio::time::sleep(seconds).await;
    let (without, _) = stream.finish().await;

    let opened_at = Instant::now();
    let limit = Duration::from_secs_f64(args.close_limit_seconds);
    let mut slow = JoinSet::new();
    for _ in 0..args.slow_connections {
        slow.spawn(drip_head(port, limit));
    }
    let stream = normal(Instant::now());
    tokio::time::sleep(seconds).await;
    let (with, _) = stream.finish().await;

    let mut close_times_ms = Vec::new();
    let mut opened = 0;
    while let Some(outcome) = slow.join_next().await {
        match outcome.expect("a slow connection") {
            SlowOutcome::Refused => {}
            SlowOutcome::Open => opened += 1,
            SlowOutcome::Closed(after) => {
                opened += 1;
                close_times_ms.push(millis(after));
            }
        }
    }
    close_times_ms.sort_by(f64::total_cmp);
    println!(
        "  slow connections done after {:.1} s",
        opened_at.elapsed().as_secs_f64()
    );
    let summary = |samples: &[Sample]| {
        let all: Vec<&Sample> = samples.iter().collect();
        let mut figures = latency_ms(&all);
        figures["statuses"] = json!(status_counts(samples));
        figures
    };
    SlowFigures {
        without: summary(&without),
        with: summary(&with),
        opened,
        close_times_ms,
        close_limit_s: args.close_limit_seconds,
    }
}

enum SlowOutcome {
    Refused,
    /// Still open when the limit passed (then closed by us).
    Open,
    /// Closed by the gateway this long after it was opened.
    Closed(Duration),
}

/// Opens a connection and sends a request head one byte a second, never finishing it, until the gateway
/// closes the connection or `limit` passes.
async fn drip_head(port: u16, limit: Duration) -> SlowOutcome {
    let opened = Instant::now();
    let Ok(Ok(mut connection)) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return SlowOutcome::Refused;
    };
    let head = b"GET /v1/faults HTTP/1.1\r\nHost: gateway\r\nX-Slow: ";
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0;
    let mut buffer = [0_u8; 1024];
    let deadline = tokio::time::sleep(limit.saturating_sub(opened.elapsed()));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return SlowOutcome::Open,
            read = connection.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return SlowOutcome::Closed(opened.elapsed()),
                Ok(_) => {} // an answer (e.g. 408) before the close; keep reading until it closes
            },
            _ = tick.tick() => {
                let byte = head.get(sent).copied().unwrap_or(b'a');
                sent += 1;
                if connection.write_all(&[byte]).await.is_err() {
                    return SlowOutcome::Closed(opened.elapsed());
                }
            }
        }
    }
}

// ----- the Resolve storm -----

struct StormFigures {
    calls: usize,
    rate: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
    errors: BTreeMap<String, u64>,
    behind_schedule_ms: f64,
    slow_windows: Vec<(f64, usize)>,
    postgres_events: Value,
}

/// Calls billing's `Resolve` once per key at `rate` per second (open loop, up to 256 calls in flight),
/// timing each call from when it was sent.
async fn resolve_storm(stack: &Stack, keys: &[String], rate: u64) -> StormFigures {
    let entitlements = entitlements_client(stack.billing.port).await;
    let digests: Vec<Vec<u8>> = keys
        .iter()
        .map(|key| Sha256::digest(key.as_bytes()).to_vec())
        .collect();
    let permits = Arc::new(Semaphore::new(256));
    let mut calls = JoinSet::new();
    let wall_start = SystemTime::now();
    let epoch = Instant::now();
    let mut behind = Duration::ZERO;
    let mut outcomes = Vec::with_capacity(keys.len());
    for (index, digest) in digests.into_iter().enumerate() {
        let due = epoch + Duration::from_secs_f64(index as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("open semaphore");
        behind = behind.max(Instant::now().saturating_duration_since(due));
        let mut client = entitlements.clone();
        calls.spawn(async move {
            let _permit = permit;
            let sent = epoch.elapsed();
            let mut request =
                tonic::Request::new(billing_pb::ResolveRequest { key_digest: digest });
            request.set_timeout(REQUEST_LIMIT);
            let outcome = client.resolve(request).await.map(drop);
            (
                sent,
                epoch.elapsed() - sent,
                outcome.err().map(|status| status.code()),
            )
        });
        while let Some(done) = calls.try_join_next() {
            outcomes.push(done.expect("a Resolve call"));
        }
    }
    while let Some(done) = calls.join_next().await {
        outcomes.push(done.expect("a Resolve call"));
    }
    let seconds = epoch.elapsed().as_secs_f64();
    let wall_end = SystemTime::now();
    let mut errors = BTreeMap::new();
    let mut latencies_ms = Vec::with_capacity(outcomes.len());
    let mut slow_by_window: BTreeMap<u64, usize> = BTreeMap::new();
    for (sent, latency, error) in &outcomes {
        if let Some(code) = error {
            *errors.entry(format!("{code:?}")).or_default() += 1;
        }
        latencies_ms.push(millis(*latency));
        if millis(*latency) > RESOLVE_P999_TARGET_MS {
            *slow_by_window
                .entry(sent.as_millis() as u64 / 100)
                .or_default() += 1;
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    let mut slow_windows: Vec<(f64, usize)> = slow_by_window
        .into_iter()
        .map(|(window, count)| (window as f64 / 10.0, count))
        .collect();
    slow_windows.sort_by_key(|window| std::cmp::Reverse(window.1));
    slow_windows.truncate(10);
    StormFigures {
        calls: outcomes.len(),
        rate,
        seconds,
        latencies_ms,
        errors,
        behind_schedule_ms: millis(behind),
        slow_windows,
        postgres_events: postgres_events(&stack.postgres.log, wall_start, wall_end),
    }
}

/// Counts what PostgreSQL logged between `from` and `to`: checkpoints, autovacuum and autoanalyze runs,
/// lock waits and statements slower than 20 ms (with the first few of those).
fn postgres_events(log: &Path, from: SystemTime, to: SystemTime) -> Value {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond]"
    );
    let (from, to) = (
        time::OffsetDateTime::from(from),
        time::OffsetDateTime::from(to),
    );
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut slow_statements = Vec::new();
    for line in text.lines() {
        let Some(stamp) = line.get(..23) else {
            continue;
        };
        let Ok(at) = time::PrimitiveDateTime::parse(stamp, format) else {
            continue;
        };
        let at = at.assume_utc();
        if at < from || at > to {
            continue;
        }
        let kind = if line.contains("checkpoint starting") {
            "checkpoints"
        } else if line.contains("automatic vacuum") {
            "autovacuums"
        } else if line.contains("automatic analyze") {
            "autoanalyzes"
        } else if line.contains("still waiting for") {
            "lock_waits"
        } else if line.contains("duration:") {
            if slow_statements.len() < 5 {
                slow_statements.push(line.chars().take(300).collect::<String>());
            }
            "statements_over_20ms"
        } else {
            continue;
        };
        *counts.entry(kind).or_default() += 1;
    }
    json!({ "counts": counts, "first_slow_statements": slow_statements })
}

// ----- the report -----

struct Report<'a> {
    args: &'a Args,
    scenarios: Vec<Scenario>,
    slow: SlowFigures,
    storm: StormFigures,
}

fn figure(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |value| format!("{value:.1}"))
}

fn met(value: Option<f64>, target: f64) -> &'static str {
    match value {
        Some(value) if value <= target => "yes",
        Some(_) => "NO",
        None => "—",
    }
}

impl Report<'_> {
    fn miscounted(&self) -> i64 {
        self.scenarios
            .iter()
            .flat_map(|scenario| &scenario.streams)
            .map(|stream| stream.lost() + stream.overcharged())
            .sum()
    }

    fn storm_percentile(&self, quantile: f64) -> f64 {
        percentile(&self.storm.latencies_ms, quantile)
    }

    fn print(&self) {
        println!(
            "\nkill -9 under steady load ({}/s with one warm key + {}/s with a new key each; dead {} s):",
            self.args.warm_rate, self.args.cold_rate, self.args.outage_seconds
        );
        println!(
            "  {:<11} {:<15} {:>10} {:>16} {:>14} {:>7} {:>7} {:>7}  statuses",
            "killed",
            "stream",
            "first 503",
            "open 503 p50/p99",
            "first 2xx",
            "2xx",
            "lost",
            "extra",
        );
        for scenario in &self.scenarios {
            for stream in &scenario.streams {
                let figures = scenario.stream_json(stream);
                let open = &figures["open_503_latency_ms"];
                println!(
                    "  {:<11} {:<15} {:>7} ms {:>6}/{:<6} ms {:>11} ms {:>7} {:>7} {:>7}  {}",
                    scenario.dependency.name(),
                    stream.name,
                    figure(figures["first_503_after_kill_ms"].as_f64()),
                    figure(open["p50"].as_f64().filter(|value| value.is_finite())),
                    figure(open["p99"].as_f64().filter(|value| value.is_finite())),
                    figure(figures["first_2xx_after_return_ms"].as_f64()),
                    stream.ok(),
                    stream.lost(),
                    stream.overcharged(),
                    status_counts(&stream.samples)
                        .iter()
                        .map(|(status, count)| format!("{status}: {count}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if let Some(error) = &scenario.restart_error {
                println!(
                    "  {:<11} did not start again: {error}",
                    scenario.dependency.name()
                );
            }
        }
        println!(
            "  (first 2xx: from the dependency answering again; \"extra\": units charged without a 2xx)"
        );

        let slow = &self.slow;
        println!(
            "\nslow clients: {} connections sending a head byte a second; normal load {}/s for {} s:",
            self.args.slow_connections, self.args.warm_rate, self.args.slow_seconds
        );
        for (name, figures) in [("without them", &slow.without), ("with them", &slow.with)] {
            println!(
                "  {name:<13} p50 {:>8.2} ms  p99 {:>8.2} ms  {}",
                figures["p50"].as_f64().unwrap_or(f64::NAN),
                figures["p99"].as_f64().unwrap_or(f64::NAN),
                figures["statuses"]
            );
        }
        println!(
            "  opened {}; closed by the gateway within {} s: {} (median {} ms, last {} ms)",
            slow.opened,
            slow.close_limit_s,
            slow.close_times_ms.len(),
            figure(Some(percentile(&slow.close_times_ms, 0.5)).filter(|v| v.is_finite())),
            figure(slow.close_times_ms.last().copied())
        );

        let storm = &self.storm;
        println!(
            "\nResolve storm: {} distinct keys at {}/s straight to billing ({:.1} s, at most {:.0} ms behind schedule):",
            storm.calls, storm.rate, storm.seconds, storm.behind_schedule_ms
        );
        println!(
            "  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  over 20 ms: {}  over {} ms: {}  errors: {:?}",
            self.storm_percentile(0.5),
            self.storm_percentile(0.99),
            self.storm_percentile(0.999),
            storm.latencies_ms.last().copied().unwrap_or(f64::NAN),
            self.storm_over(RESOLVE_P999_TARGET_MS),
            self.args.backend_deadline_ms,
            self.storm_over(self.args.backend_deadline_ms as f64),
            storm.errors
        );
        println!(
            "  PostgreSQL meanwhile: {}; slowest 100 ms windows (s: calls over 20 ms): {}",
            storm.postgres_events["counts"],
            storm
                .slow_windows
                .iter()
                .take(5)
                .map(|(at, count)| format!("{at:.1}: {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        );

        println!("\n{:<52} {:>12} {:>10}  met", "target", "measured", "goal");
        for target in self.targets() {
            println!(
                "{:<52} {:>12} {:>10}  {}",
                target["name"].as_str().unwrap_or_default(),
                target["measured"].as_str().unwrap_or_default(),
                target["goal"].as_str().unwrap_or_default(),
                target["met"].as_str().unwrap_or_default()
            );
        }
    }

    fn storm_over(&self, limit_ms: f64) -> usize {
        self.storm
            .latencies_ms
            .iter()
            .filter(|&&latency| latency > limit_ms)
            .count()
    }

    fn targets(&self) -> Vec<Value> {
        let mut targets = Vec::new();
        for scenario in &self.scenarios {
            let recovery = scenario
                .streams
                .iter()
                .map(|stream| {
                    scenario
                        .returned_at
                        .and_then(|at| stream.first_ok_after(at))
                })
                .try_fold(0.0_f64, |slowest, first| {
                    first.map(|first| slowest.max(first))
                });
            targets.push(json!({
                "name": format!("{} back: first 2xx of every stream", scenario.dependency.name()),
                "measured": recovery.map_or_else(|| "never".to_owned(), |ms| format!("{ms:.0} ms")),
                "goal": "≤ 1000 ms",
                "met": met(recovery, RECOVERY_TARGET_MS),
            }));
            let open: Vec<&Sample> = scenario
                .streams
                .iter()
                .flat_map(|stream| stream.answered_between(scenario.kill_at, scenario.outage_end()))
                .filter(|sample| sample.status == 503)
                .collect();
            let p99 = latency_ms(&open)["p99"]
                .as_f64()
                .filter(|value| value.is_finite());
            targets.push(json!({
                "name": format!("{} dead: 503 p99", scenario.dependency.name()),
                "measured": p99.map_or_else(|| "no 503".to_owned(), |ms| format!("{ms:.1} ms")),
                "goal": "≤ 5 ms",
                "met": met(p99, OPEN_503_P99_TARGET_MS),
            }));
        }
        let miscounted = self.miscounted();
        targets.push(json!({
            "name": "requests lost or charged without a 2xx",
            "measured": miscounted.to_string(),
            "goal": "0",
            "met": if miscounted == 0 { "yes" } else { "NO" },
        }));
        let slow_ratio = self.slow.with["p99"].as_f64().unwrap_or(f64::NAN)
            / self.slow.without["p99"].as_f64().unwrap_or(f64::NAN);
        targets.push(json!({
            "name": "p99 with slow connections ÷ without",
            "measured": format!("{slow_ratio:.2}"),
            "goal": "≤ 2.00",
            "met": met(Some(slow_ratio).filter(|ratio| ratio.is_finite()), 2.0),
        }));
        let closed = self.slow.close_times_ms.len();
        targets.push(json!({
            "name": "slow connections closed by the gateway",
            "measured": format!("{closed}/{}", self.slow.opened),
            "goal": "all",
            "met": if closed == self.slow.opened && closed > 0 { "yes" } else { "NO" },
        }));
        let p999 = self.storm_percentile(0.999);
        targets.push(json!({
            "name": "Resolve p99.9 under the storm",
            "measured": format!("{p999:.1} ms"),
            "goal": "≤ 20 ms",
            "met": met(Some(p999).filter(|value| value.is_finite()), RESOLVE_P999_TARGET_MS),
        }));
        let late = self.storm_over(self.args.backend_deadline_ms as f64)
            + self.storm.errors.values().sum::<u64>() as usize;
        targets.push(json!({
            "name": "Resolve calls past the deadline or failed",
            "measured": late.to_string(),
            "goal": "0",
            "met": if late == 0 { "yes" } else { "NO" },
        }));
        targets
    }

    fn to_json(&self) -> Value {
        let storm = &self.storm;
        json!({
            "label": self.args.label,
            "settings": {
                "warm_rate": self.args.warm_rate,
                "cold_rate": self.args.cold_rate,
                "steady_seconds": self.args.steady_seconds,
                "outage_seconds": self.args.outage_seconds,
                "recovery_limit_seconds": self.args.recovery_limit_seconds,
                "slow_connections": self.args.slow_connections,
                "slow_seconds": self.args.slow_seconds,
                "close_limit_seconds": self.args.close_limit_seconds,
                "storm_keys": self.args.storm_keys,
                "storm_rate": self.args.storm_rate,
                "backend_deadline_ms": self.args.backend_deadline_ms,
                "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            },
            "faults": self.scenarios.iter().map(Scenario::to_json).collect::<Vec<_>>(),
            "slow_clients": {
                "without": self.slow.without,
                "with": self.slow.with,
                "opened": self.slow.opened,
                "closed_within_limit": self.slow.close_times_ms.len(),
                "close_ms": {
                    "p50": percentile(&self.slow.close_times_ms, 0.5),
                    "max": self.slow.close_times_ms.last(),
                },
            },
            "resolve_storm": {
                "calls": storm.calls,
                "rate": storm.rate,
                "seconds": storm.seconds,
                "behind_schedule_ms": storm.behind_schedule_ms,
                "latency_ms": {
                    "p50": self.storm_percentile(0.5),
                    "p99": self.storm_percentile(0.99),
                    "p99.9": self.storm_percentile(0.999),
                    "max": storm.latencies_ms.last(),
                },
                "over_20ms": self.storm_over(RESOLVE_P999_TARGET_MS),
                "over_deadline": self.storm_over(self.args.backend_deadline_ms as f64),
                "errors": storm.errors,
                "slowest_windows_s": storm.slow_windows,
                "postgres_events": storm.postgres_events,
            },
            "miscounted_requests": self.miscounted(),
            "targets": self.targets(),
        })
    }
}
