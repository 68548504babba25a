//! The in-process entitlement cache: bounded, each entry expiring at the instant its answer stops holding
//! (or sooner), unknown digests cached briefly, and entries evicted by billing's change stream. While the
//! stream is down, everything cached is dropped and new entries live only briefly, until it is back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use moka::{Expiry, future::Cache};
use tokio_util::sync::CancellationToken;
use tonic::Request;

use proto::billing::v1::{self as billing_pb, change_event::Change};

use crate::backends::{BackendError, Backends};

/// Longest life of a known key's entry while the change stream is up.
const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// Life of an unknown digest's entry while the change stream is up.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Longest life of any entry while the change stream is down.
const DEGRADED_TTL: Duration = Duration::from_secs(1);
const MAX_ENTRIES: u64 = 200_000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What billing said about one key digest.
#[derive(Debug, Clone)]
pub enum Lookup {
    Known(Arc<billing_pb::Entitlement>),
    Unknown,
}

#[derive(Debug, Clone)]
struct Entry {
    lookup: Lookup,
    ttl: Duration,
}

struct EntryExpiry;

impl Expiry<[u8; 32], Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        entry: &Entry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// Cached entitlements, kept honest by billing's change stream.
#[derive(Clone)]
pub struct EntitlementCache {
    cache: Cache<[u8; 32], Entry>,
    backends: Backends,
    stream_up: Arc<AtomicBool>,
}

impl EntitlementCache {
    /// Returns an empty cache that resolves misses through `backends`.
    pub fn new(backends: Backends) -> Self {
        let cache = Cache::builder()
            .max_capacity(MAX_ENTRIES)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .build();
        Self {
            cache,
            backends,
            stream_up: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Returns what billing says about `digest`, from the cache when it holds an answer. Concurrent misses
    /// for one digest share one call to billing.
    pub async fn lookup(&self, digest: [u8; 32]) -> Result<Lookup, Arc<BackendError>> {
        if let Some(entry) = self.cache.get(&digest).await {
            metrics::counter!("paygate_gateway_entitlement_cache_total", "result" => "hit")
                .increment(1);
            return Ok(entry.lookup);
        }
        metrics::counter!("paygate_gateway_entitlement_cache_total", "result" => "miss")
            .increment(1);
        let entry = self
            .cache
            .try_get_with(digest, async {
                let resolved = self.backends.resolve(digest).await?;
                Ok::<_, BackendError>(self.entry_for(resolved))
            })
            .await?;
        Ok(entry.lookup)
    }

    fn entry_for(&self, resolved: Option<billing_pb::Entitlement>) -> Entry {
        let stream_up = self.stream_up.load(Ordering::Acquire);
        match resolved {
            None => Entry {
                lookup: Lookup::Unknown,
                ttl: if stream_up {
                    NEGATIVE_TTL
                } else {
                    DEGRADED_TTL
                },
            },
            Some(entitlement) => {
                let cap = if stream_up {
                    POSITIVE_TTL
                } else {
                    DEGRADED_TTL
                };
                let ttl = entitlement
                    .valid_until
                    .as_ref()
                    .map(|until| time_until(until).min(cap))
                    .unwrap_or(cap);
                Entry {
                    lookup: Lookup::Known(Arc::new(entitlement)),
                    ttl,
                }
            }
        }
    }

    /// Tells whether billing's change stream is connected.
    pub fn stream_up(&self) -> bool {
        self.stream_up.load(Ordering::Acquire)
    }

    /// Follows billing's change stream until `stop` is cancelled, evicting what changes, reconnecting with
    /// backoff (and resuming after the last sequence seen) when it drops.
    pub async fn follow_changes(self, stop: CancellationToken) {
        let mut cursor = 0_i64;
        let mut backoff = Duration::from_millis(50);
        loop {
            let followed = tokio::select! {
                () = stop.cancelled() => return,
                followed = self.follow_once(&mut cursor) => followed,
            };
            if self.stream_up.swap(false, Ordering::AcqRel) {
                // Changes may be missed until the stream is back: forget everything, and cache briefly.
                self.cache.invalidate_all();
                backoff = Duration::from_millis(50);
            }
            if let Err(error) = followed {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "billing change stream lost");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn follow_once(&self, cursor: &mut i64) -> Result<(), tonic::Status> {
        let mut stream = self
            .backends
            .billing()
            .watch_changes(Request::new(billing_pb::WatchChangesRequest {
                after_sequence: *cursor,
            }))
            .await?
            .into_inner();
        while let Some(event) = stream.message().await? {
            if !self.stream_up.swap(true, Ordering::AcqRel) {
                tracing::info!(sequence = event.sequence, "billing change stream connected");
            }
            match event.change {
                Some(Change::KeyChanged(change)) => {
                    if let Ok(digest) = <[u8; 32]>::try_from(change.key_digest.as_slice()) {
                        self.cache.invalidate(&digest).await;
                    }
                }
                Some(Change::CustomerChanged(change)) => self.evict_customer(change.customer_id),
                Some(Change::CreditsChanged(_) | Change::Heartbeat(_)) | None => {}
                Some(Change::Reset(_)) => self.cache.invalidate_all(),
            }
            *cursor = event.sequence.max(*cursor);
        }
        Ok(())
    }

    fn evict_customer(&self, customer_id: String) {
        let evicted = self.cache.invalidate_entries_if(move |_, entry| {
            matches!(&entry.lookup, Lookup::Known(entitlement) if entitlement.customer_id == customer_id)
        });
        if let Err(error) = evicted {
            tracing::error!(%error, "failed to evict a customer's entitlements; dropping all");
            self.cache.invalidate_all();
        }
    }
}

fn time_until(instant: &prost_types::Timestamp) -> Duration {
    let until = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(instant.seconds).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(instant.nanos).unwrap_or(0));
    until
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}
