//! Watches PostgreSQL in the background: gRPC health follows it, and while it is unreachable every call
//! is answered UNAVAILABLE at once instead of waiting for a pool connection that is not coming.
//!
//! The probe pings on a connection of its own, so a pool busy with a burst of calls cannot make a healthy
//! database look unreachable.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// How often PostgreSQL is pinged.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a probe (connecting included) may take before it counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Probes that time out in a row before the database counts as unreachable: slow answers on a loaded
/// host (a burst of calls on two cores) are not an outage; about a second of silence
/// is. A refused or broken connection counts at once.
const TIMEOUTS_BEFORE_DOWN: u32 = 4;
/// How often a continuing outage is logged.
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Whether PostgreSQL answered the last probes; shared by the prober and the call path.
#[derive(Clone)]
pub struct DatabaseHealth {
    reachable: Arc<AtomicBool>,
    changes: Arc<watch::Sender<bool>>,
}

impl DatabaseHealth {
    /// Returns whether the database is reachable as far as the probes know.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Returns a receiver that sees every change of reachability.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
        self.changes.send_replace(reachable);
    }
}

/// Starts probing the database of `db` every `PROBE_INTERVAL` until `stop` is cancelled; reports SERVING /
/// NOT_SERVING for `services` (and the server as a whole, `""`) on `reporter`. The database counts as
/// reachable at first (billing starts only once it has answered).
pub fn start_probe(
    db: &PgPool,
    reporter: HealthReporter,
    services: &'static [&'static str],
    stop: CancellationToken,
) -> (DatabaseHealth, tokio::task::JoinHandle<()>) {
    let health = DatabaseHealth {
        reachable: Arc::new(AtomicBool::new(true)),
        changes: Arc::new(watch::channel(true).0),
    };
    let options = (*db.connect_options()).clone();
    let task = tokio::spawn(probe(
        options,
        db.clone(),
        health.clone(),
        reporter,
        services,
        stop,
    ));
    (health, task)
}

async fn probe(
    options: PgConnectOptions,
    db: PgPool,
    health: DatabaseHealth,
    reporter: HealthReporter,
    services: &'static [&'static str],
    stop: CancellationToken,
) {
    let mut connection = None;
    let mut timeouts_in_a_row = 0;
    let mut outage: Option<Outage> = None;
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let probed = ping(&options, &mut connection).await;
        match (probed, &mut outage) {
            (Ok(()), None) => timeouts_in_a_row = 0,
            (Ok(()), Some(down)) => {
                // The pool may still hold connections broken by the outage; its ping-before-use replaces
                // them, and one acquire here does it before calls are let through.
                if tokio::time::timeout(PROBE_TIMEOUT, db.acquire())
                    .await
                    .is_ok_and(|acquired| acquired.is_ok())
                {
                    tracing::info!(
                        down_ms = down.since.elapsed().as_millis() as u64,
                        failed_probes = down.failed_probes,
                        "database reachable again; serving"
                    );
                    outage = None;
                    timeouts_in_a_row = 0;
                    health.set_reachable(true);
                    set_status(&reporter, services, ServingStatus::Serving).await;
                }
            }
            (Err(error), None) => {
                timeouts_in_a_row = match error {
                    ProbeFailure::TimedOut => timeouts_in_a_row + 1,
                    ProbeFailure::Failed(_) => u32::MAX,
                };
                if timeouts_in_a_row >= TIMEOUTS_BEFORE_DOWN {
                    tracing::warn!(%error, "database unreachable; refusing calls until it answers");
                    health.set_reachable(false);
                    set_status(&reporter, services, ServingStatus::NotServing).await;
                    outage = Some(Outage::new());
                }
            }
            (Err(error), Some(down)) => down.record_failure(&error),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    #[error("probe timed out")]
    TimedOut,
    #[error(transparent)]
    Failed(#[from] sqlx::Error),
}

async fn ping(
    options: &PgConnectOptions,
    connection: &mut Option<PgConnection>,
) -> Result<(), ProbeFailure> {
    let ping = async {
        let open = match connection {
            Some(open) => open,
            None => connection.insert(PgConnection::connect_with(options).await?),
        };
        open.ping().await
    };
    let outcome = match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(error)) => ProbeFailure::Failed(error),
        Err(_) => ProbeFailure::TimedOut,
    };
    // A connection that failed once is not trusted again: the next probe opens a new one.
    *connection = None;
    Err(outcome)
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

    fn record_failure(&mut self, error: &ProbeFailure) {
        self.failed_probes += 1;
        if self.logged.elapsed() >= OUTAGE_LOG_INTERVAL {
            self.logged = Instant::now();
            tracing::warn!(
                %error,
                down_ms = self.since.elapsed().as_millis() as u64,
                failed_probes = self.failed_probes,
                "database still unreachable"
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
