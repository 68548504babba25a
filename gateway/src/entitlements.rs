//! The in-process entitlement cache: bounded, entries evicted by billing's change stream, each answer
//! refreshed from billing once it is older than its freshness (60 s while the change stream is up, 1 s
//! while it is down) and never used past the instant billing said it stops holding.
//!
//! While billing or its change stream cannot be reached, a known key's entitlement stays in force for
//! `entitlements_stale_for` after the last instant it was known to be current (DESIGN §2, outages): every
//! change committed before the stream was lost has been applied, and no revocation can commit while
//! billing's database is down. A network partition between the gateway and a billing that still commits
//! changes can delay a revocation by up to that window; docs/gateway.md says so. Keys billing never
//! confirmed get 503, never a pass.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use moka::{Expiry, future::Cache, ops::compute::Op};
use tokio_util::sync::CancellationToken;
use tonic::Request;

use proto::billing::v1::{self as billing_pb, change_event::Change};
use time::OffsetDateTime;

use crate::backends::{BackendError, Backends};

/// How long a known key's answer is used without asking billing again while the change stream is up.
const FRESH_WHILE_STREAM_UP: Duration = Duration::from_secs(60);
/// How long an unknown digest's answer is used while the change stream is up.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long any answer is used without asking billing again while the change stream is down.
const FRESH_WHILE_STREAM_DOWN: Duration = Duration::from_secs(1);
const MAX_ENTRIES: u64 = 200_000;
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A stream that has sent nothing (not even a heartbeat; billing sends one every 10 s) for this long is
/// treated as lost.
const STREAM_SILENCE_LIMIT: Duration = Duration::from_secs(25);

/// Who a key belongs to and what their plan allows, as billing resolved it (`backends` converts billing's
/// answer into this once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlement {
    pub customer_id: String,
    /// Empty without a subscription.
    pub subscription_id: String,
    /// The plan of the (last) subscription; empty without one.
    pub plan_code: String,
    pub standing: Standing,
    /// Features the plan includes, which routes may require.
    pub features: Vec<String>,
    pub limits: Limits,
    /// The quota period usage counts units in; `None` when billing named none.
    pub period_start: Option<OffsetDateTime>,
    pub period_end: Option<OffsetDateTime>,
    /// ISO code of the customer's credits (`USD`).
    pub currency: String,
    /// The instant this answer stops holding on its own; `None` when billing named none.
    pub valid_until: Option<OffsetDateTime>,
}

/// Whether a customer's account lets requests through (DESIGN §2, step 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Trialing or active.
    Good,
    /// Past due but inside grace: admitted, with a warning header.
    PastDueInGrace,
    /// Past due beyond grace.
    PastDue,
    /// No live subscription, and never one (also what billing's unspecified standing means).
    NoSubscription,
    /// The subscription was cancelled or expired.
    Inactive,
}

/// A plan's limits, as usage applies them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Units included in the period.
    pub included_units: i64,
    /// GCRA: at most `rate_limit` requests per `rate_period_ms`, plus `burst` at once; 0 means no limit.
    pub rate_limit: u32,
    pub rate_period_ms: u32,
    pub burst: u32,
    pub overage: Overage,
    /// Credits taken per unit beyond `included_units`, with `Overage::Credits`.
    pub unit_price_micros: i64,
}

/// What happens once a period's included units are used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overage {
    /// Billing did not say; usage refuses to admit under such limits.
    #[default]
    Unspecified,
    /// Further requests are refused until the next period.
    Block,
    /// Further units are paid from prepaid credits.
    Credits,
}

/// What billing said about one key digest.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A key billing knows; `stale` when billing could not be asked and the answer is a cached one within
    /// the stale window.
    Known {
        entitlement: Arc<Entitlement>,
        stale: bool,
    },
    Unknown,
}

#[derive(Debug, Clone)]
struct Entry {
    /// `None`: billing does not know the digest.
    entitlement: Option<Arc<Entitlement>>,
    fetched: Instant,
    /// When billing's answer stops holding on its own (`valid_until`), if it said.
    holds_until: Option<Instant>,
}

struct EntryExpiry {
    keep_for: Duration,
}

impl Expiry<[u8; 32], Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        entry: &Entry,
        created_at: Instant,
    ) -> Option<Duration> {
        let keep = match entry.entitlement {
            None => NEGATIVE_TTL,
            Some(_) => self.keep_for,
        };
        Some(match entry.holds_until {
            Some(until) => until.saturating_duration_since(created_at).min(keep),
            None => keep,
        })
    }

    fn expire_after_update(
        &self,
        key: &[u8; 32],
        entry: &Entry,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, entry, updated_at)
    }
}

/// The change stream's state, as the freshness of entries depends on it.
#[derive(Debug, Clone, Copy)]
enum Stream {
    /// Connected: every cached answer is current (changes evict it).
    Up,
    /// Lost at this instant (or never connected, since the gateway started): cached answers are known to be
    /// current only up to then, or up to when they were fetched if later.
    Down { since: Instant },
}

/// A change in billing that what this gateway holds for customers (leases) must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed<'a> {
    /// The customer's plan, status, keys or credits changed.
    Customer(&'a str),
    /// Billing cannot say what changed: anything may have.
    Everyone,
}

/// Cached entitlements, kept honest by billing's change stream.
#[derive(Clone)]
pub struct EntitlementCache {
    cache: Cache<[u8; 32], Entry>,
    backends: Backends,
    stream: Arc<Mutex<Stream>>,
    stream_up: Arc<AtomicBool>,
    stale_for: Duration,
}

static RESOLVE_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static STREAM_LOST: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);

impl EntitlementCache {
    /// Returns an empty cache that resolves misses through `backends` and keeps known entitlements in
    /// force for `stale_for` while billing cannot be reached.
    pub fn new(backends: Backends, stale_for: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(MAX_ENTRIES)
            .expire_after(EntryExpiry {
                keep_for: FRESH_WHILE_STREAM_UP + stale_for,
            })
            .support_invalidation_closures()
            .build();
        metrics::counter!("paygate_gateway_entitlement_stale_serves_total").increment(0);
        Self {
            cache,
            backends,
            stream: Arc::new(Mutex::new(Stream::Down {
                since: Instant::now(),
            })),
            stream_up: Arc::new(AtomicBool::new(false)),
            stale_for,
        }
    }

    fn stream(&self) -> Stream {
        *self
            .stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_stream(&self, stream: Stream) {
        *self
            .stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stream;
        self.stream_up
            .store(matches!(stream, Stream::Up), Ordering::Release);
    }

    /// Tells whether `entry` may be used without asking billing.
    fn is_fresh(&self, entry: &Entry, now: Instant) -> bool {
        if entry.holds_until.is_some_and(|until| now >= until) {
            return false;
        }
        let age = now.saturating_duration_since(entry.fetched);
        match (&entry.entitlement, self.stream_up.load(Ordering::Acquire)) {
            (None, true) => age < NEGATIVE_TTL,
            (Some(_), true) => age < FRESH_WHILE_STREAM_UP,
            (_, false) => age < FRESH_WHILE_STREAM_DOWN,
        }
    }

    /// Tells whether a known entry may stand in for billing's answer while billing cannot be reached.
    fn is_usable_stale(&self, entry: &Entry, now: Instant) -> bool {
        if self.stale_for.is_zero()
            || entry.entitlement.is_none()
            || entry.holds_until.is_some_and(|until| now >= until)
        {
            return false;
        }
        let current_as_of = match self.stream() {
            Stream::Up => now,
            Stream::Down { since } => since.max(entry.fetched),
        };
        now.saturating_duration_since(current_as_of) <= self.stale_for
    }

    /// Returns what billing says about `digest`: from the cache while the answer is fresh, otherwise from
    /// billing (concurrent askers of one digest share one call), or — when billing cannot answer — the
    /// cached answer of a known key within the stale window. Errs when billing cannot answer and no such
    /// answer is cached.
    pub async fn lookup(&self, digest: [u8; 32]) -> Result<Lookup, Arc<BackendError>> {
        let now = Instant::now();
        let cached = self.cache.get(&digest).await;
        if let Some(entry) = cached.as_ref().filter(|entry| self.is_fresh(entry, now)) {
            metrics::counter!("paygate_gateway_entitlement_cache_total", "result" => "hit")
                .increment(1);
            return Ok(known_or_unknown(entry, false));
        }
        metrics::counter!("paygate_gateway_entitlement_cache_total", "result" => "miss")
            .increment(1);
        let computed = self
            .cache
            .entry(digest)
            .and_try_compute_with(|current| async move {
                // Someone else refreshed it while this caller waited for the key's turn.
                if current
                    .as_ref()
                    .is_some_and(|entry| self.is_fresh(entry.value(), Instant::now()))
                {
                    return Ok(Op::Nop);
                }
                let resolved = self.backends.resolve(digest).await.map_err(Arc::new)?;
                Ok::<_, Arc<BackendError>>(Op::Put(entry_for(resolved)))
            })
            .await;
        match computed {
            Ok(result) => match result.into_entry() {
                Some(entry) => Ok(known_or_unknown(entry.value(), false)),
                None => Err(Arc::new(BackendError::Failed(tonic::Status::internal(
                    "the entitlement cache lost an entry it had just written",
                )))),
            },
            Err(error) => {
                let stale = self
                    .cache
                    .get(&digest)
                    .await
                    .filter(|entry| self.is_usable_stale(entry, Instant::now()));
                if let Some(entry) = stale {
                    metrics::counter!("paygate_gateway_entitlement_stale_serves_total")
                        .increment(1);
                    return Ok(known_or_unknown(&entry, true));
                }
                if let Some(suppressed) = RESOLVE_FAILED.event() {
                    tracing::warn!(%error, suppressed, "billing could not resolve a key and no usable answer is cached");
                }
                Err(error)
            }
        }
    }

    /// Tells whether billing's change stream is connected.
    pub fn stream_up(&self) -> bool {
        self.stream_up.load(Ordering::Acquire)
    }

    /// Follows billing's change stream until `stop` is cancelled, evicting what changes, reconnecting with
    /// backoff (and resuming after the last sequence seen) when it drops.
    pub async fn follow_changes(
        self,
        stop: CancellationToken,
        on_change: impl Fn(Changed<'_>) + Send + Sync + 'static,
    ) {
        let mut cursor = 0_i64;
        let mut backoff = Duration::from_millis(50);
        loop {
            let followed = tokio::select! {
                () = stop.cancelled() => return,
                followed = self.follow_once(&mut cursor, &on_change) => followed,
            };
            if self.stream_up() {
                // Entries stay: they were current until now and are refreshed from billing within a second
                // (FRESH_WHILE_STREAM_DOWN); if billing cannot answer, they stand in for the stale window.
                self.set_stream(Stream::Down {
                    since: Instant::now(),
                });
                backoff = Duration::from_millis(50);
            }
            if let Some(suppressed) = STREAM_LOST.event() {
                match followed {
                    Err(error) => {
                        tracing::warn!(%error, suppressed, retry_in_ms = backoff.as_millis() as u64, "billing change stream lost")
                    }
                    Ok(()) => {
                        tracing::warn!(
                            suppressed,
                            retry_in_ms = backoff.as_millis() as u64,
                            "billing change stream ended"
                        )
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn follow_once(
        &self,
        cursor: &mut i64,
        on_change: &(impl Fn(Changed<'_>) + Send + Sync),
    ) -> Result<(), tonic::Status> {
        let mut stream = self
            .backends
            .billing()
            .watch_changes(Request::new(billing_pb::WatchChangesRequest {
                after_sequence: *cursor,
            }))
            .await?
            .into_inner();
        loop {
            let Ok(message) = tokio::time::timeout(STREAM_SILENCE_LIMIT, stream.message()).await
            else {
                return Err(tonic::Status::deadline_exceeded(
                    "the change stream went silent (no heartbeat)",
                ));
            };
            let Some(event) = message? else {
                return Ok(());
            };
            if !self.stream_up() {
                // The replay from the cursor evicts whatever changed while the stream was down, so from this
                // event on every cached answer is current again.
                tracing::info!(sequence = event.sequence, "billing change stream connected");
                self.set_stream(Stream::Up);
            }
            match event.change {
                Some(Change::KeyChanged(change)) => {
                    if let Ok(digest) = <[u8; 32]>::try_from(change.key_digest.as_slice()) {
                        self.cache.invalidate(&digest).await;
                    }
                    // A revoked key's customer may have been spending a lease through it: the lease goes
                    // back at once rather than at its deadline.
                    if !change.customer_id.is_empty() {
                        on_change(Changed::Customer(&change.customer_id));
                    }
                }
                Some(Change::CustomerChanged(change)) => {
                    on_change(Changed::Customer(&change.customer_id));
                    self.evict_customer(change.customer_id);
                }
                Some(Change::CreditsChanged(change)) => {
                    on_change(Changed::Customer(&change.customer_id));
                }
                Some(Change::Heartbeat(_)) | None => {}
                Some(Change::Reset(_)) => {
                    on_change(Changed::Everyone);
                    self.cache.invalidate_all();
                }
            }
            *cursor = event.sequence.max(*cursor);
        }
    }

    fn evict_customer(&self, customer_id: String) {
        let evicted = self.cache.invalidate_entries_if(move |_, entry| {
            matches!(&entry.entitlement, Some(entitlement) if entitlement.customer_id == customer_id)
        });
        if let Err(error) = evicted {
            tracing::error!(%error, "failed to evict a customer's entitlements; dropping all");
            self.cache.invalidate_all();
        }
    }
}

fn known_or_unknown(entry: &Entry, stale: bool) -> Lookup {
    match &entry.entitlement {
        Some(entitlement) => Lookup::Known {
            entitlement: entitlement.clone(),
            stale,
        },
        None => Lookup::Unknown,
    }
}

fn entry_for(resolved: Option<Entitlement>) -> Entry {
    let now = Instant::now();
    let holds_until = resolved
        .as_ref()
        .and_then(|entitlement| entitlement.valid_until)
        .map(|until| now + time_until(until));
    Entry {
        entitlement: resolved.map(Arc::new),
        fetched: now,
        holds_until,
    }
}

fn time_until(instant: OffsetDateTime) -> Duration {
    let until = SystemTime::from(instant);
    until
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}
