//! Leases held by this gateway (docs/leases.md, "Spending in the gateway"): units and GCRA slots that
//! usage reserved for one customer and that this gateway spends with one atomic operation and no network
//! call, the demand that sizes them, and the book of leases per customer. Local arithmetic only: asking,
//! renewing and returning leases over the network is the caller's.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use uuid::Uuid;

/// How much earlier than `asked_at + ttl` a lease stops spending, so that usage never sees a spend after
/// the deadline it keeps on its own clock.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(200);
/// How long a customer gets no new lease after a recall: its admissions go per request meanwhile.
pub const RECALL_COOL_DOWN: Duration = Duration::from_secs(1);
/// Time constant of the demand average: an admission counts `1/e` as much this long after it happened.
const DEMAND_TIME_CONSTANT: Duration = Duration::from_secs(1);
/// Below this many admissions per second a customer's book entry is forgotten once nothing else holds it.
const IDLE_RATE_PER_SECOND: f64 = 0.01;

// One word holds the whole spending state, so that units, slot and the closed mark change together in
// one compare-and-swap: a spender can never take units without the slot, nor anything after `close`.
const SPENT_BITS: u32 = 40;
const SLOT_BITS: u32 = 23;
const SPENT_MASK: u64 = (1 << SPENT_BITS) - 1;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const CLOSED: u64 = 1 << (SPENT_BITS + SLOT_BITS);
/// Most units one lease spends locally; a larger grant is spent up to this and the rest returned.
const MAX_LEASE_UNITS: u64 = SPENT_MASK;
/// Most slots one lease uses locally; later slots of a larger grant are returned unused.
const MAX_LEASE_SLOTS: u32 = SLOT_MASK as u32;

/// What usage granted for one lease, as the gateway received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub lease_id: Uuid,
    pub customer_id: String,
    /// Units taken from the period's included units; spent first.
    pub quota_units: u64,
    /// Overage units paid from credits, `unit_price_micros` each; spent after the quota units.
    pub credit_units: u64,
    pub unit_price_micros: u64,
    /// `None` for plans without a rate limit: admissions from the lease then need no slot.
    pub slots: Option<Slots>,
    /// Usage's lease lifetime; the local deadline is counted from the instant the grant was asked for.
    pub ttl: Duration,
    pub figures: GrantFigures,
}

/// The GCRA slots of a grant, relative to usage's clock at the grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub count: u32,
    /// When slot 0 starts (`base − now` at the grant).
    pub first_slot_offset: Duration,
    /// `e`: the plan's emission interval.
    pub emission: Duration,
    /// `τ`: burst × `e`.
    pub tolerance: Duration,
}

/// What the grant answer says for headers: the quota as usage saw it right after the grant (so `quota_used`
/// counts this lease's quota units as used) and the credit mirror after the grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantFigures {
    pub quota_limit: i64,
    pub quota_used: i64,
    pub quota_resets_at: Option<SystemTime>,
    /// `None` when usage had no credits loaded for the customer.
    pub credits_remaining_micros: Option<i64>,
}

/// What one admission took from a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    /// Units taken from the lease's quota units.
    pub from_quota: u64,
    /// Units taken from the lease's credit units.
    pub credit_units: u64,
    /// `credit_units × unit_price_micros`.
    pub credit_micros: u64,
    /// The GCRA slot the admission used; `None` for plans without a rate limit.
    pub slot: Option<u32>,
    /// Units the lease had spent in all right after this admission, for the headers of this admission.
    pub lease_spent: u64,
}

/// What a closed lease reports when it is returned; the same for every `close` of a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closing {
    pub units_spent: u64,
    /// Index of the first slot not used: usage may give slots from this one on back to the rate limiter.
    pub first_unused_slot: u32,
}

/// Header figures for an admission from a lease: the grant-time figures minus what this gateway spent
/// from the lease since. Shaped like usage's admission answer so the same header code can use either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderFigures {
    pub quota_limit: i64,
    /// Units used in the period as this gateway can tell: the lease's unspent quota units are not counted.
    pub quota_used: i64,
    pub quota_resets_at: Option<SystemTime>,
    /// The credit mirror plus the lease's unspent credits; `None` when credits were not loaded.
    pub credits_remaining_micros: Option<i64>,
}

impl HeaderFigures {
    /// Returns what `RateLimit` says is left of the period's quota.
    pub fn quota_remaining(&self) -> i64 {
        self.quota_limit.saturating_sub(self.quota_used).max(0)
    }
}

/// A grant held by this gateway and spent locally. Shared as `Arc<Lease>` by the book and the requests that
/// spend from it; all its methods take `&self` and are safe to call from any number of threads.
#[derive(Debug)]
pub struct Lease {
    grant: Grant,
    asked_at: Instant,
    received_at: Instant,
    /// Units this gateway may spend: the grant's quota and credit units, at most `MAX_LEASE_UNITS`.
    capacity: u64,
    /// Packed: the closed mark, the index of the next slot that may be used, and the units spent.
    state: AtomicU64,
    /// Set once usage has taken the lease's return: refunds against it may go to usage from then on.
    returned: AtomicBool,
}

impl Lease {
    /// Holds `grant`, asked for at `asked_at` and received at `received_at` (both on the monotonic clock).
    pub fn new(grant: Grant, asked_at: Instant, received_at: Instant) -> Self {
        let capacity = grant
            .quota_units
            .saturating_add(grant.credit_units)
            .min(MAX_LEASE_UNITS);
        Self {
            grant,
            asked_at,
            received_at: received_at.max(asked_at),
            capacity,
            state: AtomicU64::new(0),
            returned: AtomicBool::new(false),
        }
    }

    pub fn id(&self) -> Uuid {
        self.grant.lease_id
    }

    pub fn customer_id(&self) -> &str {
        &self.grant.customer_id
    }

    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Returns the instant from which nothing is spent from the lease: `asked_at + ttl − margin`. Counted
    /// from when the grant was asked for, so clock skew and the call's latency only ever make it earlier
    /// than usage's deadline.
    pub fn deadline(&self) -> Instant {
        self.asked_at + self.grant.ttl.saturating_sub(DEADLINE_MARGIN)
    }

    /// Takes `units` and the next usable slot in one atomic step. Returns `None`, taking nothing, when the
    /// lease is closed, `now` is not before its deadline, fewer than `units` are unspent, or the plan has a
    /// rate limit and no slot is usable at `now`. Slots whose window passed while unused are skipped for
    /// good.
    pub fn try_spend(&self, units: u64, now: Instant) -> Option<Spent> {
        if now >= self.deadline() {
            return None;
        }
        let window = match &self.grant.slots {
            None => None,
            Some(slots) => Some(self.usable_slots(slots, now)?),
        };
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            if current & CLOSED != 0 {
                return None;
            }
            let spent = current & SPENT_MASK;
            let after = spent
                .checked_add(units)
                .filter(|&after| after <= self.capacity)?;
            let (slot, next_slot) = match window {
                None => (None, slot_index(current)),
                Some((earliest, latest)) => {
                    let slot = slot_index(current).max(earliest);
                    if slot > latest {
                        return None;
                    }
                    (Some(slot), slot + 1)
                }
            };
            let updated = pack(after, next_slot);
            match self.state.compare_exchange_weak(
                current,
                updated,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let from_quota =
                        after.min(self.grant.quota_units) - spent.min(self.grant.quota_units);
                    let credit_units = units - from_quota;
                    return Some(Spent {
                        from_quota,
                        credit_units,
                        credit_micros: credit_units.saturating_mul(self.grant.unit_price_micros),
                        slot,
                        lease_spent: after,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Puts `units` spent from this lease back into it. Returns `false`, changing nothing, when the lease
    /// is closed (the caller then refunds against the lease through usage) or when `units` is more than the
    /// lease has spent. The slot the admission used is not given back.
    pub fn refund(&self, units: u64) -> bool {
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            if current & CLOSED != 0 {
                return false;
            }
            let Some(spent) = (current & SPENT_MASK).checked_sub(units) else {
                return false;
            };
            match self.state.compare_exchange_weak(
                current,
                pack(spent, slot_index(current)),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Closes the lease for good and returns what it spent. Every spend and refund that did not finish
    /// before the first `close` fails; later calls return the same figures.
    pub fn close(&self) -> Closing {
        let closed = self.state.fetch_or(CLOSED, Ordering::AcqRel);
        Closing {
            units_spent: closed & SPENT_MASK,
            first_unused_slot: slot_index(closed),
        }
    }

    /// Records that usage has taken this lease's return.
    pub fn mark_returned(&self) {
        self.returned.store(true, Ordering::Release);
    }

    /// Tells whether usage has taken this lease's return (late refunds against it can be applied).
    pub fn is_returned(&self) -> bool {
        self.returned.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Returns the units not spent yet (none once closed).
    pub fn remaining_units(&self) -> u64 {
        let current = self.state.load(Ordering::Acquire);
        if current & CLOSED != 0 {
            return 0;
        }
        self.capacity - (current & SPENT_MASK)
    }

    /// Returns how many slots are neither used nor expired at `now`, including those not usable yet;
    /// `None` for plans without a rate limit. A closed lease has none.
    pub fn remaining_slots(&self, now: Instant) -> Option<u32> {
        let slots = self.grant.slots.as_ref()?;
        let current = self.state.load(Ordering::Acquire);
        if current & CLOSED != 0 {
            return Some(0);
        }
        let count = slots.count.min(MAX_LEASE_SLOTS);
        let first_live = slot_index(current).max(self.first_unexpired_slot(slots, now));
        Some(count.saturating_sub(first_live))
    }

    /// Returns the header figures after `spent`, an admission from this lease.
    pub fn figures_after(&self, spent: &Spent) -> HeaderFigures {
        let figures = &self.grant.figures;
        let quota_units = self.grant.quota_units;
        let unspent_quota = quota_units - spent.lease_spent.min(quota_units);
        let credits_spent = spent.lease_spent - spent.lease_spent.min(quota_units);
        let unspent_credits = self.grant.credit_units.saturating_sub(credits_spent);
        let unspent_credit_micros = unspent_credits.saturating_mul(self.grant.unit_price_micros);
        HeaderFigures {
            quota_limit: figures.quota_limit,
            quota_used: figures
                .quota_used
                .saturating_sub(i64::try_from(unspent_quota).unwrap_or(i64::MAX))
                .max(0),
            quota_resets_at: figures.quota_resets_at,
            credits_remaining_micros: figures.credits_remaining_micros.map(|mirror| {
                mirror.saturating_add(i64::try_from(unspent_credit_micros).unwrap_or(i64::MAX))
            }),
        }
    }

    /// Returns the range of slot indices usable at `now` regardless of which were used, or `None` when no
    /// slot is. Slot `j` starts at `s_j = first_slot_offset + j × e` and is usable at local `t` when
    /// `received_at + s_j + e − τ ≤ t ≤ asked_at + s_j`.
    fn usable_slots(&self, slots: &Slots, now: Instant) -> Option<(u32, u32)> {
        let emission = nanos(slots.emission);
        if emission == 0 {
            return None;
        }
        let since_asked = signed_nanos_since(now, self.asked_at);
        let latency = signed_nanos_since(self.received_at, self.asked_at);
        let offset = nanos(slots.first_slot_offset);
        let earliest = self.first_unexpired_slot(slots, now);
        let latest_start = since_asked - latency - offset - emission + nanos(slots.tolerance);
        if latest_start < 0 {
            return None;
        }
        let count = slots.count.min(MAX_LEASE_SLOTS);
        let latest = u32::try_from(latest_start / emission)
            .unwrap_or(u32::MAX)
            .min(count.checked_sub(1)?);
        (earliest <= latest).then_some((earliest, latest))
    }

    /// Returns the first slot whose window has not closed at `now`: the least `j` with `asked_at + s_j ≥ now`.
    fn first_unexpired_slot(&self, slots: &Slots, now: Instant) -> u32 {
        let emission = nanos(slots.emission);
        let past_offset = signed_nanos_since(now, self.asked_at) - nanos(slots.first_slot_offset);
        if emission == 0 {
            return if past_offset > 0 { u32::MAX } else { 0 };
        }
        match u128::try_from(past_offset) {
            Ok(past) if past > 0 => {
                u32::try_from(past.div_ceil(emission.unsigned_abs())).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

fn pack(spent: u64, next_slot: u32) -> u64 {
    // A slot index past the last representable one means "no slot left", which any index ≥ count says too.
    (u64::from(next_slot).min(SLOT_MASK) << SPENT_BITS) | spent
}

fn slot_index(state: u64) -> u32 {
    ((state >> SPENT_BITS) & SLOT_MASK) as u32
}

fn nanos(duration: Duration) -> i128 {
    duration.as_nanos() as i128
}

/// Returns `later − earlier` in nanoseconds, negative when `later` is before `earlier`.
fn signed_nanos_since(later: Instant, earlier: Instant) -> i128 {
    match later.checked_duration_since(earlier) {
        Some(after) => nanos(after),
        None => -nanos(earlier.duration_since(later)),
    }
}

/// How leases are sized and when a customer gets one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sizing {
    /// A lease is sized for this long of the customer's demand.
    pub horizon: Duration,
    /// A lease is renewed when what is left of it (units, slots or time) covers less than this long.
    pub renew_ahead: Duration,
    /// Admissions per second from which a customer is admitted from leases rather than per request.
    pub hot_rate_per_second: f64,
    pub max_units: u64,
    pub max_slots: u32,
}

impl Default for Sizing {
    fn default() -> Self {
        Self {
            horizon: Duration::from_millis(500),
            renew_ahead: Duration::from_millis(250),
            hot_rate_per_second: 20.0,
            max_units: 1_000_000,
            max_slots: 10_000,
        }
    }
}

/// What to ask usage for in a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub units: u64,
    /// Only meaningful for plans with a rate limit; usage ignores it otherwise.
    pub slots: u32,
    /// The largest single admission seen for the customer: a smaller grant is useless.
    pub min_units: u64,
}

/// One customer's demand: time-decayed averages of admissions and units per second.
#[derive(Debug)]
pub struct Demand {
    average: Mutex<DemandAverage>,
}

#[derive(Debug)]
struct DemandAverage {
    admissions_per_second: f64,
    units_per_second: f64,
    largest_admission: u64,
    at: Instant,
}

/// Demand figures at one instant.
#[derive(Clone, Copy, Debug, PartialEq)]
struct DemandRates {
    admissions_per_second: f64,
    units_per_second: f64,
    largest_admission: u64,
}

impl Demand {
    pub fn new(now: Instant) -> Self {
        Self {
            average: Mutex::new(DemandAverage {
                admissions_per_second: 0.0,
                units_per_second: 0.0,
                largest_admission: 0,
                at: now,
            }),
        }
    }

    /// Counts one admission of `units` at `now`, whether it was admitted from a lease or per request.
    pub fn record_admission(&self, units: u64, now: Instant) {
        let mut average = self.lock();
        let decay = decay_between(average.at, now);
        let weight = 1.0 / DEMAND_TIME_CONSTANT.as_secs_f64();
        average.admissions_per_second = average.admissions_per_second * decay + weight;
        average.units_per_second = average.units_per_second * decay + units as f64 * weight;
        average.largest_admission = average.largest_admission.max(units);
        average.at = average.at.max(now);
    }

    /// Returns the average admissions per second at `now`.
    pub fn admissions_per_second(&self, now: Instant) -> f64 {
        self.rates(now).admissions_per_second
    }

    /// Returns whether the customer is busy enough at `now` to be admitted from leases.
    pub fn is_hot(&self, now: Instant, sizing: &Sizing) -> bool {
        self.admissions_per_second(now) >= sizing.hot_rate_per_second
    }

    /// Returns the grant to ask for: `horizon` of demand in units and slots, within the sizing's maxima,
    /// and never fewer units than the largest admission seen.
    pub fn wanted(&self, now: Instant, sizing: &Sizing) -> Wanted {
        let rates = self.rates(now);
        let horizon = sizing.horizon.as_secs_f64();
        let min_units = rates.largest_admission.max(1);
        let units = ((rates.units_per_second * horizon).ceil() as u64)
            .min(sizing.max_units)
            .max(min_units);
        let slots = ((rates.admissions_per_second * horizon).ceil() as u32)
            .clamp(1, sizing.max_slots.max(1));
        Wanted {
            units,
            slots,
            min_units,
        }
    }

    /// Returns whether `lease` should be renewed at `now`: what is left of its units, slots or time covers
    /// less than `renew_ahead` of demand, or not the largest admission seen.
    pub fn needs_renewal(&self, lease: &Lease, now: Instant, sizing: &Sizing) -> bool {
        let rates = self.rates(now);
        let ahead = sizing.renew_ahead.as_secs_f64();
        let units_needed =
            ((rates.units_per_second * ahead).ceil() as u64).max(rates.largest_admission);
        if lease.remaining_units() < units_needed.max(1) {
            return true;
        }
        if let Some(slots) = lease.remaining_slots(now) {
            let slots_needed = ((rates.admissions_per_second * ahead).ceil() as u32).max(1);
            if slots < slots_needed {
                return true;
            }
        }
        lease.deadline().saturating_duration_since(now) < sizing.renew_ahead
    }

    fn rates(&self, now: Instant) -> DemandRates {
        let average = self.lock();
        let decay = decay_between(average.at, now);
        DemandRates {
            admissions_per_second: average.admissions_per_second * decay,
            units_per_second: average.units_per_second * decay,
            largest_admission: average.largest_admission,
        }
    }

    fn lock(&self) -> MutexGuard<'_, DemandAverage> {
        self.average
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Returns how much an average taken at `then` still counts at `now`; an earlier `now` (a caller that read
/// the clock just before another) decays nothing.
fn decay_between(then: Instant, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(then).as_secs_f64();
    (-elapsed / DEMAND_TIME_CONSTANT.as_secs_f64()).exp()
}

/// A lease taken out of the book, already closed, with the figures its return reports.
#[derive(Clone, Debug)]
pub struct LeaseToReturn {
    pub lease: Arc<Lease>,
    pub closing: Closing,
}

impl LeaseToReturn {
    fn close(lease: Arc<Lease>) -> Self {
        let closing = lease.close();
        Self { lease, closing }
    }
}

/// An admission taken from a lease: `lease` is kept by the request so that a refund goes back into it.
#[derive(Clone, Debug)]
pub struct LeaseSpend {
    pub lease: Arc<Lease>,
    pub spent: Spent,
}

/// Permission to ask usage for one grant for a customer. A grant asked for under a ticket that a recall,
/// a change or shutdown has overtaken is not spent: [`LeaseBook::install`] hands it back for return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AskTicket {
    pub customer_id: String,
    pub wanted: Wanted,
    epoch: u64,
}

/// The leases of this gateway: per customer the lease in use, the demand that sizes it, and at most one
/// grant being asked for.
#[derive(Debug)]
pub struct LeaseBook {
    sizing: Sizing,
    book: RwLock<Book>,
}

#[derive(Debug, Default)]
struct Book {
    customers: HashMap<String, Entry>,
    /// Set at shutdown: no lease is installed any more.
    closed: bool,
}

#[derive(Debug)]
struct Entry {
    demand: Demand,
    lease: Option<Arc<Lease>>,
    /// The epoch of the ask in flight, if any.
    asking: Option<u64>,
    /// Advanced whenever the customer's leases are taken out, so that grants asked for before arrive stale.
    epoch: u64,
    cool_down_until: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            demand: Demand::new(now),
            lease: None,
            asking: None,
            epoch: 0,
            cool_down_until: None,
        }
    }

    fn is_cooling_down(&self, now: Instant) -> bool {
        self.cool_down_until.is_some_and(|until| now < until)
    }

    fn take_out(&mut self) -> Option<LeaseToReturn> {
        self.epoch += 1;
        self.asking = None;
        self.lease.take().map(LeaseToReturn::close)
    }
}

impl LeaseBook {
    pub fn new(sizing: Sizing) -> Self {
        Self {
            sizing,
            book: RwLock::new(Book::default()),
        }
    }

    pub fn sizing(&self) -> &Sizing {
        &self.sizing
    }

    /// Takes `units` for an admission of `customer_id` at `now` from its lease. `None` when the customer has
    /// no lease or the lease cannot cover it: the request is then admitted per request.
    pub fn spend(&self, customer_id: &str, units: u64, now: Instant) -> Option<LeaseSpend> {
        let lease = self.read().customers.get(customer_id)?.lease.clone()?;
        let spent = lease.try_spend(units, now)?;
        Some(LeaseSpend { lease, spent })
    }

    /// Counts an admission of `units` for `customer_id` at `now` in its demand, however it was admitted.
    pub fn record_admission(&self, customer_id: &str, units: u64, now: Instant) {
        if let Some(entry) = self.read().customers.get(customer_id) {
            entry.demand.record_admission(units, now);
            return;
        }
        self.write()
            .customers
            .entry(customer_id.to_owned())
            .or_insert_with(|| Entry::new(now))
            .demand
            .record_admission(units, now);
    }

    /// Returns a ticket to ask usage for a grant for `customer_id` when it should get one at `now`: it is
    /// hot, not cooling down after a recall, has no ask in flight, and has no lease or one that needs
    /// renewal. The ask stays in flight until [`Self::install`] or [`Self::abandon_ask`].
    pub fn begin_ask(&self, customer_id: &str, now: Instant) -> Option<AskTicket> {
        let worth_asking = self
            .read()
            .customers
            .get(customer_id)
            .is_some_and(|entry| self.should_ask(entry, now));
        if !worth_asking {
            return None;
        }
        let mut book = self.write();
        if book.closed {
            return None;
        }
        let entry = book.customers.get_mut(customer_id)?;
        // Checked again: another request may have begun an ask between the two locks.
        if !self.should_ask(entry, now) {
            return None;
        }
        entry.asking = Some(entry.epoch);
        Some(AskTicket {
            customer_id: customer_id.to_owned(),
            wanted: entry.demand.wanted(now, &self.sizing),
            epoch: entry.epoch,
        })
    }

    fn should_ask(&self, entry: &Entry, now: Instant) -> bool {
        entry.asking.is_none()
            && !entry.is_cooling_down(now)
            && entry.demand.is_hot(now, &self.sizing)
            && entry
                .lease
                .as_ref()
                .is_none_or(|lease| entry.demand.needs_renewal(lease, now, &self.sizing))
    }

    /// Ends the ask of `ticket` without a lease (usage answered empty or failed); the customer may be asked
    /// for again.
    pub fn abandon_ask(&self, ticket: &AskTicket) {
        if let Some(entry) = self.write().customers.get_mut(&ticket.customer_id)
            && entry.asking == Some(ticket.epoch)
        {
            entry.asking = None;
        }
    }

    /// Ends the ask of `ticket` without a lease and asks for none for its customer before `until`: usage
    /// answered empty (the customer is near exhaustion, or its plan cannot be leased) or failed, and asking
    /// again at once would cost a call per request.
    pub fn decline(&self, ticket: &AskTicket, until: Instant) {
        if let Some(entry) = self.write().customers.get_mut(&ticket.customer_id)
            && entry.asking == Some(ticket.epoch)
        {
            entry.asking = None;
            entry.cool_down_until = Some(entry.cool_down_until.map_or(until, |at| at.max(until)));
        }
    }

    /// Puts `lease`, granted under `ticket`, in use for its customer and returns what must go back to
    /// usage: the lease it replaces, or `lease` itself when the ticket was overtaken by a recall, a change
    /// or shutdown.
    pub fn install(&self, ticket: &AskTicket, lease: Lease) -> Vec<LeaseToReturn> {
        let lease = Arc::new(lease);
        let mut book = self.write();
        if book.closed {
            return vec![LeaseToReturn::close(lease)];
        }
        let Some(entry) = book.customers.get_mut(&ticket.customer_id) else {
            return vec![LeaseToReturn::close(lease)];
        };
        if entry.epoch != ticket.epoch || lease.customer_id() != ticket.customer_id {
            return vec![LeaseToReturn::close(lease)];
        }
        if entry.asking == Some(ticket.epoch) {
            entry.asking = None;
        }
        entry
            .lease
            .replace(lease)
            .map(LeaseToReturn::close)
            .into_iter()
            .collect()
    }

    /// Takes out `customer_id`'s leases after a recall and asks for none for it until `now +
    /// RECALL_COOL_DOWN`; a grant in flight is returned when it arrives.
    pub fn recall(&self, customer_id: &str, now: Instant) -> Vec<LeaseToReturn> {
        let mut book = self.write();
        let entry = book
            .customers
            .entry(customer_id.to_owned())
            .or_insert_with(|| Entry::new(now));
        entry.cool_down_until = Some(now + RECALL_COOL_DOWN);
        entry.take_out().into_iter().collect()
    }

    /// Takes out `customer_id`'s leases after a billing change; a grant in flight is returned when it
    /// arrives, and the next one is asked for under the new terms.
    pub fn take_customer(&self, customer_id: &str) -> Vec<LeaseToReturn> {
        self.write()
            .customers
            .get_mut(customer_id)
            .and_then(Entry::take_out)
            .into_iter()
            .collect()
    }

    /// Takes out every lease for return at shutdown; grants still in flight are returned when they arrive
    /// and none is asked for any more.
    pub fn take_all(&self) -> Vec<LeaseToReturn> {
        let mut book = self.write();
        book.closed = true;
        book.customers
            .values_mut()
            .filter_map(Entry::take_out)
            .collect()
    }

    /// Takes out every lease for return, and lets grants in flight be returned when they arrive; leases
    /// may be asked for again afterwards (billing lost track of changes, or recalls cannot reach us).
    pub fn take_every_lease(&self) -> Vec<LeaseToReturn> {
        self.write()
            .customers
            .values_mut()
            .filter_map(Entry::take_out)
            .collect()
    }

    /// Returns how many customers hold a lease now.
    pub fn leases_held(&self) -> usize {
        self.read()
            .customers
            .values()
            .filter(|entry| entry.lease.is_some())
            .count()
    }

    /// Takes out the leases that can no longer be spent at `now` (deadline passed, or every unit or slot
    /// gone) for return, and forgets customers with nothing left to remember.
    pub fn take_expired(&self, now: Instant) -> Vec<LeaseToReturn> {
        let mut book = self.write();
        let mut expired = Vec::new();
        book.customers.retain(|_, entry| {
            if entry
                .lease
                .as_ref()
                .is_some_and(|lease| is_spent_out(lease, now))
            {
                expired.extend(entry.lease.take().map(LeaseToReturn::close));
            }
            entry.lease.is_some()
                || entry.asking.is_some()
                || entry.is_cooling_down(now)
                || entry.demand.admissions_per_second(now) >= IDLE_RATE_PER_SECOND
        });
        expired
    }

    fn read(&self) -> RwLockReadGuard<'_, Book> {
        self.book
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Book> {
        self.book
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Returns whether nothing more can be spent from `lease` at `now` or later.
fn is_spent_out(lease: &Lease, now: Instant) -> bool {
    now >= lease.deadline()
        || lease.is_closed()
        || lease.remaining_units() == 0
        || lease.remaining_slots(now) == Some(0)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Barrier,
            atomic::{AtomicBool, AtomicU64},
        },
        thread,
    };

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn grant(quota_units: u64, credit_units: u64, slots: Option<Slots>) -> Grant {
        Grant {
            lease_id: Uuid::new_v4(),
            customer_id: "customer-1".to_owned(),
            quota_units,
            credit_units,
            unit_price_micros: 1_000,
            slots,
            ttl: Duration::from_secs(2),
            figures: GrantFigures {
                quota_limit: 1_000,
                quota_used: 600,
                quota_resets_at: None,
                credits_remaining_micros: Some(20_000),
            },
        }
    }

    /// Slots of a plan at 100/s with a burst of 10: `e` = 10 ms, `τ` = 100 ms, slot 0 starting 2 ms after
    /// the grant.
    fn slots(count: u32) -> Slots {
        Slots {
            count,
            first_slot_offset: 2 * MS,
            emission: 10 * MS,
            tolerance: 100 * MS,
        }
    }

    fn lease(grant: Grant, asked_at: Instant, latency: Duration) -> Lease {
        Lease::new(grant, asked_at, asked_at + latency)
    }

    /// Records admissions of `units` every `interval` for `lasting`, starting at `from`; returns the end.
    fn admit_steadily(
        demand: &Demand,
        units: u64,
        interval: Duration,
        from: Instant,
        lasting: Duration,
    ) -> Instant {
        let mut now = from;
        while now < from + lasting {
            demand.record_admission(units, now);
            now += interval;
        }
        now - interval
    }

    #[test]
    fn a_lease_spends_its_quota_units_before_its_credit_units() {
        let now = Instant::now();
        let lease = lease(grant(3, 10, None), now, MS);

        let spends: Vec<_> = (0..3)
            .map(|_| lease.try_spend(2, now + MS).expect("covered"))
            .map(|spent| (spent.from_quota, spent.credit_units, spent.credit_micros))
            .collect();

        assert_eq!(spends, [(2, 0, 0), (1, 1, 1_000), (0, 2, 2_000)]);
    }

    #[test]
    fn a_spend_larger_than_what_is_left_takes_nothing() {
        let now = Instant::now();
        let lease = lease(grant(3, 2, None), now, MS);
        lease.try_spend(4, now + MS).expect("covered");

        let refused = lease.try_spend(2, now + MS);

        assert_eq!(refused, None);
        assert_eq!(lease.remaining_units(), 1);
        assert_eq!(lease.close().units_spent, 4);
    }

    #[test]
    fn the_local_deadline_counts_from_the_ask_so_latency_only_shortens_it() {
        let asked_at = Instant::now();
        let slow = lease(grant(100, 0, None), asked_at, 300 * MS);
        let fast = lease(grant(100, 0, None), asked_at, MS);

        let deadlines = (slow.deadline(), fast.deadline());
        let just_before = slow.try_spend(1, asked_at + 1_799 * MS);
        let at_deadline = slow.try_spend(1, asked_at + 1_800 * MS);

        assert_eq!(deadlines, (asked_at + 1_800 * MS, asked_at + 1_800 * MS));
        assert!(just_before.is_some());
        assert_eq!(at_deadline, None);
    }

    #[test]
    fn a_ttl_shorter_than_the_margin_leaves_nothing_to_spend() {
        let asked_at = Instant::now();
        let mut short = grant(100, 0, None);
        short.ttl = 150 * MS;
        let lease = lease(short, asked_at, Duration::ZERO);

        assert_eq!(lease.try_spend(1, asked_at), None);
    }

    #[test]
    fn slots_are_never_used_before_their_window_opens() {
        let asked_at = Instant::now();
        let lease = lease(grant(1_000, 0, Some(slots(20))), asked_at, MS);

        let at_receipt: Vec<_> = (0..12)
            .map_while(|_| lease.try_spend(1, asked_at + MS))
            .map(|spent| spent.slot)
            .collect();
        let ten_ms_later = lease
            .try_spend(1, asked_at + 11 * MS)
            .map(|spent| spent.slot);
        let again = lease.try_spend(1, asked_at + 11 * MS);

        // Slot j opens at asked_at + 1 + 2 + 10j + 10 − 100 ms: slots 0..=8 at 1 ms, slot 9 at 11 ms.
        assert_eq!(at_receipt, (0..=8u32).map(Some).collect::<Vec<_>>());
        assert_eq!(ten_ms_later, Some(Some(9)));
        assert_eq!(again, None);
    }

    #[test]
    fn slots_whose_window_passed_unused_are_skipped_for_good() {
        let asked_at = Instant::now();
        let lease = lease(grant(1_000, 0, Some(slots(20))), asked_at, MS);

        let late = lease.try_spend(1, asked_at + 55 * MS).expect("a live slot");
        let earlier_again = lease
            .try_spend(1, asked_at + 10 * MS)
            .expect("a later slot");

        // Slot j closes at asked_at + 2 + 10j ms: at 55 ms slots 0..=5 are gone.
        assert_eq!(late.slot, Some(6));
        assert_eq!(earlier_again.slot, Some(7));
        assert_eq!(lease.close().first_unused_slot, 8);
    }

    #[test]
    fn a_latency_longer_than_the_slack_of_a_slot_makes_no_slot_usable() {
        let asked_at = Instant::now();
        let lease = lease(grant(1_000, 0, Some(slots(20))), asked_at, 95 * MS);

        let any = (95..1_800).find_map(|ms| lease.try_spend(1, asked_at + ms * MS));

        assert_eq!(any, None);
    }

    #[test]
    fn every_slot_spent_lies_within_its_window_and_after_the_last() {
        let asked_at = Instant::now();
        let latency = 7 * MS;
        let slots = Slots {
            count: 400,
            first_slot_offset: 3 * MS,
            emission: 3 * MS,
            tolerance: 60 * MS,
        };
        let lease = lease(grant(10_000, 0, Some(slots)), asked_at, latency);

        let mut used = Vec::new();
        for tenth_ms in 70..18_000 {
            let now = asked_at + Duration::from_micros(100 * tenth_ms);
            if tenth_ms % 7 < 4
                && let Some(spent) = lease.try_spend(1, now)
            {
                used.push((now, spent.slot.expect("a rate-limited plan")));
            }
        }

        assert!(used.len() > 100);
        assert!(used.windows(2).all(|pair| pair[0].1 < pair[1].1));
        for (now, slot) in used {
            let start = slots.first_slot_offset + slots.emission * slot;
            assert!(asked_at + latency + start + slots.emission <= now + slots.tolerance);
            assert!(now <= asked_at + start);
        }
    }

    #[test]
    fn concurrent_spenders_take_exactly_what_the_lease_holds() {
        const THREADS: u64 = 8;
        const ATTEMPTS: u64 = 500;
        for capacity in [1_000, THREADS * ATTEMPTS, 10_000] {
            let now = Instant::now();
            let lease = lease(grant(capacity / 2, capacity - capacity / 2, None), now, MS);
            let admitted = AtomicU64::new(0);
            let start = Barrier::new(THREADS as usize);

            thread::scope(|scope| {
                for _ in 0..THREADS {
                    scope.spawn(|| {
                        start.wait();
                        for _ in 0..ATTEMPTS {
                            if lease.try_spend(1, now + MS).is_some() {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });

            let admitted = admitted.into_inner();
            assert_eq!(admitted, capacity.min(THREADS * ATTEMPTS));
            assert_eq!(lease.close().units_spent, admitted);
        }
    }

    #[test]
    fn concurrent_spenders_never_share_a_slot() {
        let asked_at = Instant::now();
        let wide = Slots {
            count: 1_000,
            first_slot_offset: 2 * MS,
            emission: Duration::from_micros(100),
            tolerance: 50 * MS,
        };
        let lease = lease(grant(10_000, 0, Some(wide)), asked_at, MS);
        let slots_taken = Mutex::new(Vec::new());

        thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let mine: Vec<_> = (0..200)
                        .filter_map(|_| lease.try_spend(1, asked_at + MS))
                        .filter_map(|spent| spent.slot)
                        .collect();
                    slots_taken.lock().expect("not poisoned").extend(mine);
                });
            }
        });

        let mut slots_taken = slots_taken.into_inner().expect("not poisoned");
        slots_taken.sort_unstable();
        // At 1 ms, slot j is usable when 1 + 2 + 0.1j + 0.1 − 50 ≤ 1 (j ≤ 479) and 1 ≤ 2 + 0.1j.
        assert_eq!(slots_taken, (0..=479u32).collect::<Vec<_>>());
        assert_eq!(lease.close().units_spent, 480);
    }

    #[test]
    fn nothing_is_spent_after_close_even_by_spenders_already_running() {
        let now = Instant::now();
        let lease = lease(grant(1_000_000, 0, None), now, MS);
        let admitted = AtomicU64::new(0);
        let admitted_after_close = AtomicU64::new(0);
        let closed = AtomicBool::new(false);

        let closing = thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    loop {
                        let closed_before = closed.load(Ordering::Acquire);
                        if lease.try_spend(1, now + MS).is_none() {
                            break;
                        }
                        admitted.fetch_add(1, Ordering::Relaxed);
                        if closed_before {
                            admitted_after_close.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    assert_eq!(lease.try_spend(1, now + MS), None);
                });
            }
            while lease.remaining_units() > 1_000_000 - 1_000 {
                thread::yield_now();
            }
            let closing = lease.close();
            closed.store(true, Ordering::Release);
            closing
        });

        assert_eq!(admitted.into_inner(), closing.units_spent);
        assert_eq!(admitted_after_close.into_inner(), 0);
        assert!(closing.units_spent >= 1_000);
    }

    #[test]
    fn a_refund_goes_back_into_an_open_lease_credits_first() {
        let now = Instant::now();
        let lease = lease(grant(3, 10, None), now, MS);
        lease.try_spend(5, now + MS).expect("covered");

        let refunded = lease.refund(5);
        let next = lease.try_spend(4, now + MS).expect("covered");

        assert!(refunded);
        assert_eq!((next.from_quota, next.credit_units), (3, 1));
        assert_eq!(lease.remaining_units(), 9);
    }

    #[test]
    fn a_refund_after_close_is_refused_and_changes_nothing() {
        let now = Instant::now();
        let lease = lease(grant(10, 0, None), now, MS);
        lease.try_spend(5, now + MS).expect("covered");
        let first = lease.close();

        let refunded = lease.refund(5);

        assert!(!refunded);
        assert_eq!(lease.close(), first);
        assert_eq!(first.units_spent, 5);
    }

    #[test]
    fn a_refund_of_more_than_was_spent_is_refused() {
        let now = Instant::now();
        let lease = lease(grant(10, 0, None), now, MS);
        lease.try_spend(2, now + MS).expect("covered");

        assert!(!lease.refund(3));
        assert_eq!(lease.remaining_units(), 8);
    }

    #[test]
    fn close_is_final_and_answers_the_same_every_time() {
        let asked_at = Instant::now();
        let lease = lease(grant(10, 0, Some(slots(20))), asked_at, MS);
        lease.try_spend(2, asked_at + MS).expect("covered");
        lease.try_spend(3, asked_at + MS).expect("covered");

        let first = lease.close();
        let spend_after = lease.try_spend(1, asked_at + MS);
        let second = lease.close();

        assert_eq!(
            first,
            Closing {
                units_spent: 5,
                first_unused_slot: 2
            }
        );
        assert_eq!(spend_after, None);
        assert_eq!(second, first);
        assert_eq!(lease.remaining_units(), 0);
    }

    #[test]
    fn header_figures_are_the_grant_figures_minus_what_was_spent_here_since() {
        let now = Instant::now();
        let lease = lease(grant(100, 50, None), now, MS);

        let within_quota = lease.try_spend(30, now + MS).expect("covered");
        let into_credits = lease.try_spend(90, now + MS).expect("covered");

        // The grant saw 600 used, the lease's 100 quota units among them; 20 000 µ in the mirror.
        let first = lease.figures_after(&within_quota);
        assert_eq!(first.quota_used, 530);
        assert_eq!(first.quota_remaining(), 470);
        assert_eq!(first.credits_remaining_micros, Some(70_000));
        let second = lease.figures_after(&into_credits);
        assert_eq!(second.quota_used, 600);
        assert_eq!(second.credits_remaining_micros, Some(50_000));
        assert_eq!(second.quota_limit, 1_000);
    }

    #[test]
    fn demand_is_sized_for_half_a_second_of_admissions() {
        let demand = Demand::new(Instant::now());
        let now = admit_steadily(&demand, 4, 10 * MS, Instant::now(), Duration::from_secs(5));

        let wanted = demand.wanted(now, &Sizing::default());

        // 100 admissions/s of 4 units: 200 units and 50 slots, give or take the average's own lag.
        assert!((195..=210).contains(&wanted.units), "{wanted:?}");
        assert!((49..=52).contains(&wanted.slots), "{wanted:?}");
        assert_eq!(wanted.min_units, 4);
    }

    #[test]
    fn wanted_units_stay_below_the_maximum_but_never_below_the_largest_admission() {
        let start = Instant::now();
        let sizing = Sizing {
            max_units: 50,
            max_slots: 10,
            ..Sizing::default()
        };
        let demand = Demand::new(start);
        let now = admit_steadily(&demand, 4, MS, start, Duration::from_secs(2));

        let capped = demand.wanted(now, &sizing);
        demand.record_admission(500, now);
        let at_least_the_largest = demand.wanted(now, &sizing);

        assert_eq!((capped.units, capped.slots), (50, 10));
        assert_eq!(at_least_the_largest.units, 500);
        assert_eq!(at_least_the_largest.min_units, 500);
    }

    #[test]
    fn demand_fades_once_admissions_stop() {
        let start = Instant::now();
        let demand = Demand::new(start);
        let end = admit_steadily(&demand, 1, 10 * MS, start, Duration::from_secs(3));

        let busy = demand.admissions_per_second(end);
        let idle = demand.admissions_per_second(end + Duration::from_secs(5));

        assert!((90.0..=105.0).contains(&busy), "{busy}");
        assert!(idle < 1.0, "{idle}");
    }

    #[test]
    fn a_lease_is_renewed_when_its_units_cover_less_than_a_quarter_second() {
        let start = Instant::now();
        let sizing = Sizing::default();
        let demand = Demand::new(start);
        let now = admit_steadily(&demand, 4, 10 * MS, start, Duration::from_secs(5));
        let lease = lease(grant(1_000, 0, None), now, MS);

        let when_full = demand.needs_renewal(&lease, now + MS, &sizing);
        lease.try_spend(890, now + MS).expect("covered");
        let above_the_mark = demand.needs_renewal(&lease, now + MS, &sizing);
        lease.try_spend(20, now + MS).expect("covered");
        let below_the_mark = demand.needs_renewal(&lease, now + MS, &sizing);

        // A quarter second of 100 admissions/s of 4 units is about 100 units.
        assert!(!when_full);
        assert!(!above_the_mark);
        assert!(below_the_mark);
    }

    #[test]
    fn a_lease_is_renewed_when_its_live_slots_cover_less_than_a_quarter_second() {
        let start = Instant::now();
        let sizing = Sizing::default();
        let demand = Demand::new(start);
        let now = admit_steadily(&demand, 1, 10 * MS, start, Duration::from_secs(5));
        let granted_at = |ago: Duration| lease(grant(10_000, 0, Some(slots(60))), now - ago, MS);

        let at_grant = demand.needs_renewal(&granted_at(MS), now, &sizing);
        // Slot j closes 2 + 10j ms after the ask: 300 ms on 30 slots are left, 400 ms on 20; a quarter
        // second of 100 admissions/s needs 25.
        let with_thirty_left = demand.needs_renewal(&granted_at(300 * MS), now, &sizing);
        let with_twenty_left = demand.needs_renewal(&granted_at(400 * MS), now, &sizing);

        assert!(!at_grant);
        assert!(!with_thirty_left);
        assert!(with_twenty_left);
    }

    #[test]
    fn a_lease_is_renewed_a_quarter_second_before_its_deadline() {
        let start = Instant::now();
        let sizing = Sizing::default();
        let demand = Demand::new(start);
        let now = admit_steadily(&demand, 1, 10 * MS, start, Duration::from_secs(5));
        let lease = lease(grant(1_000_000, 0, None), now, MS);

        assert!(!demand.needs_renewal(&lease, now + 1_500 * MS, &sizing));
        assert!(demand.needs_renewal(&lease, now + 1_551 * MS, &sizing));
    }

    fn hot_book(start: Instant) -> (LeaseBook, Instant) {
        let book = LeaseBook::new(Sizing::default());
        let mut now = start;
        for _ in 0..300 {
            book.record_admission("customer-1", 1, now);
            now += 10 * MS;
        }
        (book, now)
    }

    #[test]
    fn a_customer_below_the_hot_rate_is_admitted_per_request() {
        let start = Instant::now();
        let book = LeaseBook::new(Sizing::default());
        for tick in 0..50 {
            book.record_admission("customer-1", 1, start + 100 * MS * tick);
        }

        let ticket = book.begin_ask("customer-1", start + 5 * Duration::from_secs(1));

        assert_eq!(ticket, None);
    }

    #[test]
    fn a_hot_customer_gets_one_ask_at_a_time_and_spends_the_lease_it_installs() {
        let (book, now) = hot_book(Instant::now());

        let ticket = book.begin_ask("customer-1", now).expect("hot");
        let second = book.begin_ask("customer-1", now);
        let returned = book.install(&ticket, lease(grant(100, 0, None), now, MS));
        let spend = book.spend("customer-1", 3, now + MS).expect("leased");

        assert_eq!(second, None);
        assert!(returned.is_empty());
        assert_eq!(spend.spent.from_quota, 3);
        assert_eq!(spend.lease.remaining_units(), 97);
        assert_eq!(
            book.spend("customer-2", 1, now + MS)
                .map(|spend| spend.spent),
            None
        );
    }

    #[test]
    fn a_renewed_lease_replaces_the_old_one_which_goes_back_closed() {
        let (book, now) = hot_book(Instant::now());
        let ticket = book.begin_ask("customer-1", now).expect("hot");
        book.install(&ticket, lease(grant(30, 0, None), now, MS));
        book.spend("customer-1", 25, now + MS).expect("leased");
        let renewal = book
            .begin_ask("customer-1", now + MS)
            .expect("below the mark");

        let returned = book.install(&renewal, lease(grant(100, 0, None), now + MS, MS));
        let spend = book.spend("customer-1", 10, now + 3 * MS).expect("leased");

        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].closing.units_spent, 25);
        assert!(returned[0].lease.is_closed());
        assert_eq!(spend.lease.remaining_units(), 90);
    }

    #[test]
    fn after_a_recall_the_customer_gets_no_lease_for_the_cool_down() {
        let (book, now) = hot_book(Instant::now());
        let first = book.begin_ask("customer-1", now).expect("hot");
        book.install(&first, lease(grant(10, 0, None), now, MS));
        book.spend("customer-1", 7, now + MS).expect("leased");
        let in_flight = book
            .begin_ask("customer-1", now + MS)
            .expect("below the mark");
        let recall_at = now + 2 * MS;

        let recalled = book.recall("customer-1", recall_at);
        let arriving = book.install(&in_flight, lease(grant(100, 0, None), recall_at, MS));
        let spend = book.spend("customer-1", 1, recall_at + MS);
        let during = book.begin_ask("customer-1", recall_at + 999 * MS);
        book.record_admission("customer-1", 1, recall_at + RECALL_COOL_DOWN);
        let after = book.begin_ask("customer-1", recall_at + RECALL_COOL_DOWN);

        assert_eq!(recalled.len(), 1);
        assert_eq!(recalled[0].closing.units_spent, 7);
        assert_eq!(arriving.len(), 1);
        assert!(arriving[0].lease.is_closed());
        assert!(spend.is_none());
        assert_eq!(during, None);
        assert!(after.is_some());
    }

    #[test]
    fn a_declined_ask_waits_until_the_pause_ends_before_asking_again() {
        let (book, now) = hot_book(Instant::now());
        let ticket = book.begin_ask("customer-1", now).expect("hot");

        book.decline(&ticket, now + 500 * MS);
        let during = book.begin_ask("customer-1", now + 499 * MS);
        book.record_admission("customer-1", 1, now + 500 * MS);
        let after = book.begin_ask("customer-1", now + 500 * MS);

        assert_eq!(during, None);
        assert!(after.is_some());
    }

    #[test]
    fn a_stale_decline_does_not_end_a_newer_ask() {
        let (book, now) = hot_book(Instant::now());
        let stale = book.begin_ask("customer-1", now).expect("hot");
        book.take_customer("customer-1");
        let current = book.begin_ask("customer-1", now + MS).expect("asked again");

        book.decline(&stale, now + 500 * MS);
        let returned = book.install(&current, lease(grant(100, 0, None), now + MS, MS));

        assert!(returned.is_empty());
        assert!(book.spend("customer-1", 1, now + 2 * MS).is_some());
    }

    #[test]
    fn taking_every_lease_keeps_the_book_open_for_new_asks() {
        let (book, now) = hot_book(Instant::now());
        let ticket = book.begin_ask("customer-1", now).expect("hot");
        book.install(&ticket, lease(grant(100, 0, None), now, MS));
        book.spend("customer-1", 4, now + MS).expect("leased");

        let returned = book.take_every_lease();
        let next = book.begin_ask("customer-1", now + 2 * MS);

        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].closing.units_spent, 4);
        assert_eq!(book.leases_held(), 0);
        assert!(next.is_some());
    }

    #[test]
    fn leases_past_their_deadline_are_taken_out_for_return() {
        let (book, now) = hot_book(Instant::now());
        let ticket = book.begin_ask("customer-1", now).expect("hot");
        book.install(&ticket, lease(grant(100, 0, None), now, MS));

        let before = book.take_expired(now + 1_799 * MS);
        let after = book.take_expired(now + 1_800 * MS);

        assert!(before.is_empty());
        assert_eq!(after.len(), 1);
        assert!(book.spend("customer-1", 1, now + 1_801 * MS).is_none());
    }

    #[test]
    fn at_shutdown_every_lease_goes_back_and_late_grants_are_returned_at_once() {
        let (book, now) = hot_book(Instant::now());
        book.record_admission("customer-2", 1, now);
        let ticket = book.begin_ask("customer-1", now).expect("hot");
        book.install(&ticket, lease(grant(10, 0, None), now, MS));
        book.spend("customer-1", 8, now + MS).expect("leased");
        let renewal = book
            .begin_ask("customer-1", now + MS)
            .expect("below the mark");

        let returned = book.take_all();
        let late = book.install(&renewal, lease(grant(100, 0, None), now + MS, MS));

        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].closing.units_spent, 8);
        assert_eq!(late.len(), 1);
        assert!(late[0].lease.is_closed());
        assert!(book.begin_ask("customer-1", now + 2 * MS).is_none());
    }

    #[test]
    fn a_billing_change_takes_the_customers_lease_out_without_a_cool_down() {
        let (book, now) = hot_book(Instant::now());
        let ticket = book.begin_ask("customer-1", now).expect("hot");
        book.install(&ticket, lease(grant(100, 0, None), now, MS));

        let returned = book.take_customer("customer-1");
        let next = book.begin_ask("customer-1", now + MS);

        assert_eq!(returned.len(), 1);
        assert!(book.spend("customer-1", 1, now + MS).is_none());
        assert!(next.is_some());
    }
}
