//! The network side of leases (docs/leases.md): asking usage for grants for hot customers, returning
//! leases when they are spent out, expire, are recalled, or their customer changes in billing, and
//! refunds against leases. The request path only spends and refunds in memory (`leases::LeaseBook`) and
//! drops asks into a queue; everything that waits on usage happens in the tasks here.
//!
//! A lease is only asked for while this gateway's recall stream is up: another gateway's admission that
//! needs units held here must be able to reach us, or it would be refused while the units sit idle. When
//! the stream drops, every lease is returned and the gateway admits per request until it is back.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    backends::{Backends, LeaseAsk, ReturnOutcome},
    entitlements::Entitlement,
    leases::{AskTicket, Lease, LeaseBook, LeaseSpend, LeaseToReturn, Sizing},
};

/// How often leases that can no longer be spent are looked for and returned.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How long a customer is admitted per request after usage answered an empty grant for it.
const EMPTY_GRANT_PAUSE: Duration = Duration::from_millis(500);
/// How long a customer is admitted per request after asking usage for a grant failed.
const FAILED_ASK_PAUSE: Duration = Duration::from_secs(1);
/// Most asks sent in one `Lease` call (usage takes up to 1,000).
const MAX_ASKS_PER_CALL: usize = 256;
/// Most leases returned in one `ReturnLeases` call (usage takes up to 1,000).
const MAX_RETURNS_PER_CALL: usize = 500;
/// How long a return that usage could not take is retried. Past usage's deadline and grace the lease is
/// written off anyway; trying a little longer lets usage answer that instead of leaving it unknown.
const RETURN_RETRY_FOR: Duration = Duration::from_secs(10);
/// Bounds of the delay before the recall stream is opened again.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// An ask for a grant, queued by the request path for the asking task.
struct PendingAsk {
    ticket: AskTicket,
    entitlement: Arc<Entitlement>,
}

/// A refund of an admission from a lease that was closed before the refund came: it goes to usage once
/// usage has taken the lease's return.
struct LateRefund {
    lease: Arc<Lease>,
    request_id: String,
    units: u64,
}

/// This gateway's leases and the tasks that keep them.
pub struct Lessor {
    holder: Uuid,
    book: LeaseBook,
    backends: Backends,
    asks: mpsc::UnboundedSender<PendingAsk>,
    queued_asks: Mutex<Option<mpsc::UnboundedReceiver<PendingAsk>>>,
    recalls_up: AtomicBool,
    /// Late refunds waiting for their lease's return, by lease id.
    late_refunds: Mutex<HashMap<Uuid, Vec<LateRefund>>>,
}

impl Lessor {
    /// Returns a lessor asking usage through `backends`, as a holder of its own (a fresh id per process).
    pub fn new(backends: Backends, sizing: Sizing) -> Self {
        let (asks, queued) = mpsc::unbounded_channel();
        for event in [
            "granted",
            "empty",
            "failed",
            "returned",
            "recalled",
            "written_off",
        ] {
            metrics::counter!("paygate_gateway_lease_events_total", "event" => event).increment(0);
        }
        for via in ["lease", "usage"] {
            metrics::counter!("paygate_gateway_admissions_total", "via" => via).increment(0);
        }
        metrics::gauge!("paygate_gateway_leases_held").set(0.0);
        Self {
            holder: Uuid::new_v4(),
            book: LeaseBook::new(sizing),
            backends,
            asks,
            queued_asks: Mutex::new(Some(queued)),
            recalls_up: AtomicBool::new(false),
            late_refunds: Mutex::new(HashMap::new()),
        }
    }

    /// This gateway's holder id, as usage knows it.
    pub fn holder(&self) -> Uuid {
        self.holder
    }

    /// Takes `units` for an admission of `customer_id` from its lease; `None` when it has none that can
    /// cover them now (the request is then admitted per request). No await, no lock held across I/O.
    pub fn spend(&self, customer_id: &str, units: u64) -> Option<LeaseSpend> {
        self.book.spend(customer_id, units, Instant::now())
    }

    /// Counts an admission of `units` for the customer of `entitlement`, however it was admitted, and
    /// queues an ask for a grant when the customer is hot and its lease runs low.
    pub fn admitted(&self, entitlement: &Arc<Entitlement>, units: u64) {
        let now = Instant::now();
        let customer_id = entitlement.customer_id.as_str();
        self.book.record_admission(customer_id, units, now);
        if !self.recalls_up.load(Ordering::Acquire) {
            return;
        }
        if let Some(ticket) = self.book.begin_ask(customer_id, now) {
            let ask = PendingAsk {
                ticket,
                entitlement: entitlement.clone(),
            };
            if let Err(unsent) = self.asks.send(ask) {
                self.book.abandon_ask(&unsent.0.ticket);
            }
        }
    }

    /// Gives back `units` that request `request_id` spent from `spend`'s lease: into the lease while it is
    /// open, otherwise to usage once usage has taken the lease's return.
    pub fn refund(&self, spend: &LeaseSpend, request_id: &str, units: u64) {
        if spend.lease.refund(units) {
            return;
        }
        let refund = LateRefund {
            lease: spend.lease.clone(),
            request_id: request_id.to_owned(),
            units,
        };
        let mut waiting = self.lock_late_refunds();
        if refund.lease.is_returned() {
            drop(waiting);
            self.send_late_refund(&refund);
        } else {
            waiting.entry(refund.lease.id()).or_default().push(refund);
        }
    }

    /// Returns `customer_id`'s leases after a change in billing (plan, status, credits), so that the next
    /// grant is asked for under the new terms.
    pub fn customer_changed(self: &Arc<Self>, customer_id: &str) {
        let leases = self.book.take_customer(customer_id);
        self.return_in_background(leases);
    }

    /// Returns every lease (billing's change stream restarted from scratch: any customer may have changed).
    pub fn everyone_changed(self: &Arc<Self>) {
        let leases = self.book.take_every_lease();
        self.return_in_background(leases);
    }

    /// Runs the asking, expiry and recall tasks until `stop` is cancelled, then returns every lease still
    /// held (one attempt, under the backend deadline) and stops.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(mut queued) = self
            .queued_asks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        else {
            tracing::error!("the lessor was started twice; leases stay off");
            return;
        };
        let recalls = tokio::spawn(self.clone().follow_recalls(stop.clone()));
        let mut expiry = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                ask = queued.recv() => {
                    let Some(first) = ask else { break };
                    let mut batch = vec![first];
                    while batch.len() < MAX_ASKS_PER_CALL {
                        match queued.try_recv() {
                            Ok(ask) => batch.push(ask),
                            Err(_) => break,
                        }
                    }
                    tokio::spawn(self.clone().ask(batch));
                }
                _ = expiry.tick() => {
                    let expired = self.book.take_expired(Instant::now());
                    self.return_in_background(expired);
                    metrics::gauge!("paygate_gateway_leases_held").set(self.book.leases_held() as f64);
                }
            }
        }
        let _ = recalls.await;
        let held = self.book.take_all();
        while let Ok(ask) = queued.try_recv() {
            self.book.abandon_ask(&ask.ticket);
        }
        if !held.is_empty() {
            let count = held.len();
            match self.return_leases(&held).await {
                Ok(()) => tracing::info!(leases = count, "leases returned at shutdown"),
                Err(ReturnFailed { error, .. }) => {
                    tracing::warn!(%error, leases = count, "leases not returned at shutdown; usage writes them off after their deadline")
                }
            }
        }
        metrics::gauge!("paygate_gateway_leases_held").set(0.0);
    }

    /// Asks usage for the grants of `batch` in one call and puts what comes back in use.
    async fn ask(self: Arc<Self>, batch: Vec<PendingAsk>) {
        let asks: Vec<LeaseAsk<'_>> = batch
            .iter()
            .map(|pending| LeaseAsk {
                lease_id: Uuid::new_v4(),
                entitlement: &pending.entitlement,
                wanted: pending.ticket.wanted,
            })
            .collect();
        let asked_at = Instant::now();
        let answers = self.backends.lease(self.holder, &asks).await;
        let received_at = Instant::now();
        let answers = match answers {
            Ok(answers) => answers,
            Err(error) => {
                count_event("failed", batch.len());
                if let Some(suppressed) = ASK_FAILED.event() {
                    tracing::warn!(%error, suppressed, "usage could not grant leases; admitting per request");
                }
                for pending in &batch {
                    self.book
                        .decline(&pending.ticket, received_at + FAILED_ASK_PAUSE);
                }
                return;
            }
        };
        let mut to_return = Vec::new();
        for (pending, answer) in batch.iter().zip(answers) {
            match answer {
                Ok(Some(grant)) => {
                    count_event("granted", 1);
                    let lease = Lease::new(grant, asked_at, received_at);
                    to_return.extend(self.book.install(&pending.ticket, lease));
                }
                Ok(None) => {
                    count_event("empty", 1);
                    self.book
                        .decline(&pending.ticket, received_at + EMPTY_GRANT_PAUSE);
                }
                Err(why) => {
                    count_event("failed", 1);
                    if let Some(suppressed) = ASK_FAILED.event() {
                        tracing::warn!(customer_id = %pending.ticket.customer_id, why, suppressed, "lease not granted; admitting per request");
                    }
                    self.book
                        .decline(&pending.ticket, received_at + FAILED_ASK_PAUSE);
                }
            }
        }
        self.return_in_background(to_return);
    }

    /// Follows this holder's recall stream until `stop`, opening it again whenever it drops. While it is
    /// down no lease is asked for, and the leases held when it dropped are returned.
    async fn follow_recalls(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = RECONNECT_MIN;
        loop {
            let opened = tokio::select! {
                () = stop.cancelled() => return,
                opened = self.backends.watch_recalls(self.holder) => opened,
            };
            match opened {
                Ok(mut recalls) => {
                    self.recalls_up.store(true, Ordering::Release);
                    backoff = RECONNECT_MIN;
                    tracing::debug!(holder = %self.holder, "lease recall stream open");
                    loop {
                        let next = tokio::select! {
                            () = stop.cancelled() => {
                                self.recalls_up.store(false, Ordering::Release);
                                return;
                            }
                            next = recalls.next() => next,
                        };
                        match next {
                            Some(Ok(customer_id)) => self.recalled(&customer_id),
                            Some(Err(status)) => {
                                if let Some(suppressed) = RECALLS_LOST.event() {
                                    tracing::warn!(error = %crate::backends::describe_failure(&status), suppressed, "lease recall stream lost; returning leases and admitting per request");
                                }
                                break;
                            }
                            None => break,
                        }
                    }
                    self.recalls_up.store(false, Ordering::Release);
                    let held = self.book.take_every_lease();
                    self.return_in_background(held);
                }
                Err(error) => {
                    if let Some(suppressed) = RECALLS_LOST.event() {
                        tracing::warn!(%error, suppressed, retry_in_ms = backoff.as_millis() as u64, "lease recall stream not open; admitting per request");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    /// Returns `customer_id`'s leases at once: another gateway's admission waits for them.
    fn recalled(self: &Arc<Self>, customer_id: &str) {
        let leases = self.book.recall(customer_id, Instant::now());
        count_event("recalled", leases.len());
        self.return_in_background(leases);
    }

    /// Returns `leases` to usage in the background, retrying what usage could not take.
    fn return_in_background(self: &Arc<Self>, leases: Vec<LeaseToReturn>) {
        if leases.is_empty() {
            return;
        }
        let lessor = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut pending = leases;
            let mut delay = Duration::from_millis(50);
            loop {
                match lessor.return_leases(&pending).await {
                    Ok(()) => return,
                    Err(ReturnFailed { again, error }) => {
                        pending = again;
                        if started.elapsed() >= RETURN_RETRY_FOR {
                            if let Some(suppressed) = RETURN_ABANDONED.event() {
                                tracing::error!(%error, leases = pending.len(), suppressed, "leases not returned; usage writes them off after their deadline (their spending is not billed)");
                            }
                            for lease in &pending {
                                lessor.settled(&lease.lease);
                            }
                            return;
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        });
    }

    /// Returns `leases` in calls of at most `MAX_RETURNS_PER_CALL`; the error holds those to send again.
    async fn return_leases(&self, leases: &[LeaseToReturn]) -> Result<(), ReturnFailed> {
        let mut again = Vec::new();
        let mut last_error = String::new();
        for chunk in leases.chunks(MAX_RETURNS_PER_CALL) {
            match self.backends.return_leases(self.holder, chunk).await {
                Ok(outcomes) => {
                    for (lease, outcome) in chunk.iter().zip(outcomes) {
                        match outcome {
                            ReturnOutcome::Returned => {
                                count_event("returned", 1);
                                self.settled(&lease.lease);
                            }
                            ReturnOutcome::WrittenOff => {
                                count_event("written_off", 1);
                                tracing::warn!(lease_id = %lease.lease.id(), customer_id = %lease.lease.customer_id(), "lease returned after its deadline and written off: its spending is not billed");
                                self.settled(&lease.lease);
                            }
                            ReturnOutcome::Unknown => {
                                tracing::warn!(lease_id = %lease.lease.id(), customer_id = %lease.lease.customer_id(), "usage knows no such lease");
                                self.settled(&lease.lease);
                            }
                            ReturnOutcome::Retry(why) => {
                                last_error = why;
                                again.push(lease.clone());
                            }
                        }
                    }
                }
                Err(error) => {
                    last_error = error.to_string();
                    again.extend(chunk.iter().cloned());
                }
            }
        }
        if again.is_empty() {
            Ok(())
        } else {
            Err(ReturnFailed {
                again,
                error: last_error,
            })
        }
    }

    /// Marks `lease` settled with usage (returned, written off, or given up on) and sends the late refunds
    /// that waited for it. Usage applies a late refund only against a lease it took back and billed; for
    /// any other it changes nothing, so sending is always safe and nothing waits forever.
    fn settled(&self, lease: &Arc<Lease>) {
        let waiting = {
            let mut waiting = self.lock_late_refunds();
            lease.mark_returned();
            waiting.remove(&lease.id())
        };
        for refund in waiting.into_iter().flatten() {
            self.send_late_refund(&refund);
        }
    }

    fn send_late_refund(&self, refund: &LateRefund) {
        self.backends.refund_from_returned_lease(
            refund.lease.customer_id(),
            refund.lease.id(),
            &refund.request_id,
            refund.units,
        );
    }

    fn lock_late_refunds(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<LateRefund>>> {
        self.late_refunds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Leases usage could not take, to send again, and why.
struct ReturnFailed {
    again: Vec<LeaseToReturn>,
    error: String,
}

fn count_event(event: &'static str, count: usize) {
    metrics::counter!("paygate_gateway_lease_events_total", "event" => event)
        .increment(count as u64);
}

static ASK_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static RECALLS_LOST: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static RETURN_ABANDONED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
