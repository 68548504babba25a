//! Watches Redis in the background: gRPC health follows it, and while it is unreachable every call is
//! answered UNAVAILABLE at once instead of waiting on a connection that is not coming.
//!
//! The probe pings on a connection of its own, so a burst of admissions queued on the shared connection
//! cannot make a healthy Redis look unreachable.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use redis::{
    AsyncConnectionConfig,
    aio::{ConnectionManager, MultiplexedConnection},
};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// How often Redis is pinged.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a probe (connecting included) may take before it counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Probes that time out in a row before Redis counts as unreachable: slow answers on a loaded host (a
/// burst of thousands of admissions on two cores) are not an outage; about a second of silence is. A
/// refused or dropped connection counts at once.
const TIMEOUTS_BEFORE_DOWN: u32 = 4;
/// How often a continuing outage is logged.
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Whether Redis answered the last probes; shared by the prober and the call path.
#[derive(Clone)]
pub struct RedisHealth {
    reachable: Arc<AtomicBool>,
}

impl RedisHealth {
    /// Returns whether Redis is reachable as far as the probes know.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

/// What the prober needs: a way to open its own connection, and the shared connection to warm up before
/// calls are let through again.
pub struct RedisProbe {
    client: redis::Client,
    shared: ConnectionManager,
}

impl RedisProbe {
    /// Returns a probe of the Redis at `url`; `shared` is the connection the counters use.
    pub fn new(url: &str, shared: ConnectionManager) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("REDIS_URL is not a valid Redis URL")?;
        Ok(Self::with_client(client, shared))
    }

    /// Returns a probe that opens its connection through `client` (for example one with TLS settings);
    /// `shared` is the connection the counters use.
    pub fn with_client(client: redis::Client, shared: ConnectionManager) -> Self {
        Self { client, shared }
    }

    /// Returns a client of the probed Redis (for connections of their own, such as pub/sub).
    pub fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// Starts probing every `PROBE_INTERVAL` until `stop` is cancelled; reports SERVING / NOT_SERVING for
    /// `services` (and the server as a whole, `""`) on `reporter`. Redis counts as reachable at first
    /// (usage starts only once it has answered).
    pub fn start(
        self,
        reporter: HealthReporter,
        services: &'static [&'static str],
        stop: CancellationToken,
    ) -> (RedisHealth, tokio::task::JoinHandle<()>) {
        let health = RedisHealth {
            reachable: Arc::new(AtomicBool::new(true)),
        };
        let task = tokio::spawn(self.run(health.clone(), reporter, services, stop));
        (health, task)
    }

    async fn run(
        self,
        health: RedisHealth,
        reporter: HealthReporter,
        services: &'static [&'static str],
        stop: CancellationToken,
    ) {
        let mut probe_connection = None;
        let mut timeouts_in_a_row = 0;
        let mut outage: Option<Outage> = None;
        let mut ticks = tokio::time::interval(PROBE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let probed = self.ping(&mut probe_connection).await;
            match (probed, &mut outage) {
                (Ok(()), None) => timeouts_in_a_row = 0,
                (Ok(()), Some(down)) => {
                    // The shared connection may still hold the failed attempt of the outage: the first
                    // command on it would fail and only then reconnect.
                    if self.warm_shared_connection().await.is_ok() {
                        tracing::info!(
                            down_ms = down.since.elapsed().as_millis() as u64,
                            failed_probes = down.failed_probes,
                            "redis reachable again; serving"
                        );
                        outage = None;
                        timeouts_in_a_row = 0;
                        health.reachable.store(true, Ordering::Relaxed);
                        set_status(&reporter, services, ServingStatus::Serving).await;
                    }
                }
                (Err(error), None) => {
                    timeouts_in_a_row = if error.is_timeout() {
                        timeouts_in_a_row + 1
                    } else {
                        u32::MAX
                    };
                    if timeouts_in_a_row >= TIMEOUTS_BEFORE_DOWN {
                        tracing::warn!(%error, "redis unreachable; refusing calls until it answers");
                        health.reachable.store(false, Ordering::Relaxed);
                        set_status(&reporter, services, ServingStatus::NotServing).await;
                        outage = Some(Outage::new());
                    }
                }
                (Err(error), Some(down)) => down.record_failure(&error),
            }
        }
    }

    async fn ping(&self, connection: &mut Option<MultiplexedConnection>) -> redis::RedisResult<()> {
        let ping = async {
            if connection.is_none() {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(PROBE_TIMEOUT))
                    .set_response_timeout(Some(PROBE_TIMEOUT));
                let opened = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                *connection = Some(opened);
            }
            let Some(open) = connection.as_mut() else {
                unreachable!("the probe connection was just opened")
            };
            redis::cmd("PING").query_async::<()>(open).await
        };
        let outcome = ping.await;
        if outcome.is_err() {
            *connection = None;
        }
        outcome
    }

    async fn warm_shared_connection(&self) -> redis::RedisResult<()> {
        let mut shared = self.shared.clone();
        let mut outcome = Ok(());
        // The first attempt may only report the outage's failed connection and start a new one.
        for _ in 0..2 {
            outcome = match tokio::time::timeout(
                PROBE_TIMEOUT,
                redis::cmd("PING").query_async::<()>(&mut shared),
            )
            .await
            {
                Ok(answer) => answer,
                Err(_) => Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                ))),
            };
            if outcome.is_ok() {
                break;
            }
        }
        outcome
    }
}

/// A continuing outage, logged once per `OUTAGE_LOG_INTERVAL` with a count.
struct Outage {
    since: Instant,
    logged: Instant,
    failed_probes: u64,
}

impl Outage {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            since: now,
            logged: now,
            failed_probes: 1,
        }
    }

    fn record_failure(&mut self, error: &redis::RedisError) {
        self.failed_probes += 1;
        if self.logged.elapsed() >= OUTAGE_LOG_INTERVAL {
            self.logged = Instant::now();
            tracing::warn!(
                %error,
                down_ms = self.since.elapsed().as_millis() as u64,
                failed_probes = self.failed_probes,
                "redis still unreachable"
            );
        }
    }
}

async fn set_status(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}
