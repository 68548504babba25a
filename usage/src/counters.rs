//! All of usage's Redis state and the Lua scripts that change it. Nothing here sees a proto type.
//!
//! Key layout, for prefix `P` and customer `C` (every key of one customer shares the hash tag `{c:C}`, so
//! each script touches one Redis Cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{c:C}:rate` | string | GCRA theoretical arrival time, µs since the epoch (expires when idle) |
//! | `P:{c:C}:q:<subscription>:<period start ms>` | string | units used in that period (kept 7 days past its end) |
//! | `P:{c:C}:cr` | hash | `b` spendable credits (micros), `s` billing feed sequence it was loaded as of, `n` the last outbox number sealed, `v` version (moved by loads, credit changes, acknowledgements and repairs) |
//! | `P:{c:C}:gp` | hash | credit changes that arrived before the balance was loaded: reference → `seq:delta` |
//! | `P:{c:C}:ga` | set | references of credit changes already applied |
//! | `P:{c:C}:r:<request id>` | string | what an admission took and answered, for replays and refunds (24 h) |
//! | `P:{c:C}:ob` | hash | net spending not yet sealed: `u\|<sub>\|<ps>` units, `c\|<sub>\|<ps>` credits |
//! | `P:{c:C}:os` | hash | sealed spending being reported to billing, `_id` its id, `_n` its number |
//! | `P:{c:C}:lh` | hash | outstanding leases: lease id → record, aggregates `_q` quota units, `_c` credit micros, `_s` slots (see `scripts/lease_core.lua`) |
//! | `P:{c:C}:lg:<lease id>` | string | a lease grant's answer, for replays (24 h) |
//! | `P:{c:C}:lr:<lease id>` | string | a returned or written-off lease, for replays and late refunds (24 h) |
//! | `P:{c:C}:lf:<request id>` | string | marks a late refund of a request admitted from a lease (24 h) |
//! | `P:leases` | sorted set | `<customer>/<lease id>` by the instant (ms) it is due to be written off; written before the grant, so every granted lease is in it (cleaned up lazily) |
//!
//! The credits hash also holds `w`, the credits of leases written off: never billed, so billing's ledger
//! still counts them, and never spendable again.
//!
//! Pub/sub channels: `P:recall` carries "<customer> <holder>…" (return that customer's leases), and
//! `P:returned` carries "<customer>" after one of its leases was returned or written off.

use redis::{Script, aio::ConnectionManager};
use uuid::Uuid;

/// How long an admission is remembered for replays and refunds.
const REQUEST_TTL_SECONDS: u64 = 24 * 3600;
/// The request record of an id refunded before any admission: the answer of a refusal (rate limited, retry
/// at once) taking nothing, already marked refunded (admit_core.lua's record format).
const REFUNDED_BEFORE_ADMISSION: &str = "2,0,0,0,0,0,-1,0,0,0;0;0;0;-;-;1";
/// How long a period's counter outlives the period, for late refunds and reads.
const QUOTA_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Names the Redis keys of one deployment (see the module documentation for the layout).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Returns key names under `prefix` (tests use a random one for isolation).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    fn customer(&self, customer: Uuid) -> String {
        format!("{}:{{c:{customer}}}", self.prefix)
    }

    pub fn rate(&self, customer: Uuid) -> String {
        format!("{}:rate", self.customer(customer))
    }

    pub fn quota(&self, customer: Uuid, subscription: Uuid, period_start_ms: i64) -> String {
        format!(
            "{}:q:{subscription}:{period_start_ms}",
            self.customer(customer)
        )
    }

    pub fn credits(&self, customer: Uuid) -> String {
        format!("{}:cr", self.customer(customer))
    }

    pub fn pending_grants(&self, customer: Uuid) -> String {
        format!("{}:gp", self.customer(customer))
    }

    pub fn applied_grants(&self, customer: Uuid) -> String {
        format!("{}:ga", self.customer(customer))
    }

    pub fn request(&self, customer: Uuid, request_id: &str) -> String {
        format!("{}:r:{request_id}", self.customer(customer))
    }

    pub fn outbox(&self, customer: Uuid) -> String {
        format!("{}:ob", self.customer(customer))
    }

    pub fn sealed(&self, customer: Uuid) -> String {
        format!("{}:os", self.customer(customer))
    }

    pub fn leases(&self, customer: Uuid) -> String {
        format!("{}:lh", self.customer(customer))
    }

    pub fn lease_grant(&self, customer: Uuid, lease: Uuid) -> String {
        format!("{}:lg:{lease}", self.customer(customer))
    }

    pub fn lease_returned(&self, customer: Uuid, lease: Uuid) -> String {
        format!("{}:lr:{lease}", self.customer(customer))
    }

    pub fn lease_refund(&self, customer: Uuid, request_id: &str) -> String {
        format!("{}:lf:{request_id}", self.customer(customer))
    }

    /// Returns the sorted set of every lease by the instant it is due to be written off.
    pub fn lease_deadlines(&self) -> String {
        format!("{}:leases", self.prefix)
    }

    /// Returns the channel recalls are published on.
    pub fn recall_channel(&self) -> String {
        format!("{}:recall", self.prefix)
    }

    /// Returns the channel returns (and write-offs) are announced on.
    pub fn returned_channel(&self) -> String {
        format!("{}:returned", self.prefix)
    }

    /// Returns every key an admission of `admission` may touch, in the admit script's order.
    pub fn admission(&self, admission: &Admission) -> [String; 6] {
        let customer = admission.customer;
        [
            self.rate(customer),
            self.quota(customer, admission.subscription, admission.period_start_ms),
            self.credits(customer),
            self.request(customer, &admission.request_id),
            self.outbox(customer),
            self.leases(customer),
        ]
    }

    /// Returns the `MATCH` pattern of every customer's open or sealed outbox.
    fn outbox_pattern(&self) -> String {
        format!("{}:{{c:*}}:o?", escape_glob(&self.prefix))
    }

    /// Returns the `MATCH` pattern of every customer's credits hash.
    fn credits_pattern(&self) -> String {
        format!("{}:{{c:*}}:cr", escape_glob(&self.prefix))
    }

    /// Returns the customer whose credits hash `key` is, if it is one of ours.
    fn customer_of_credits(&self, key: &str) -> Option<Uuid> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{c:")?;
        let (customer, suffix) = rest.split_once('}')?;
        (suffix == ":cr").then_some(())?;
        Uuid::parse_str(customer).ok()
    }

    /// Returns the customer whose open or sealed outbox `key` is, if it is one of ours.
    fn customer_of_outbox(&self, key: &str) -> Option<Uuid> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{c:")?;
        let (customer, suffix) = rest.split_once('}')?;
        matches!(suffix, ":ob" | ":os").then_some(())?;
        Uuid::parse_str(customer).ok()
    }
}

fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// What overage costs under a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overage {
    Block,
    Credits { unit_price_micros: i64 },
}

/// One request to decide, with the limits billing gave for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub request_id: String,
    pub customer: Uuid,
    pub subscription: Uuid,
    pub units: i64,
    /// 0: no rate limit.
    pub rate_limit: u32,
    pub rate_period_ms: u32,
    pub burst: u32,
    pub included_units: i64,
    pub overage: Overage,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
}

impl Admission {
    fn outbox_field(&self) -> String {
        format!("{}|{}", self.subscription, self.period_start_ms)
    }
}

/// Why a request was refused, or that it was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    RateLimited,
    QuotaExhausted,
    CreditsExhausted,
    /// The plan pays overage from credits and the customer's balance is not loaded yet; nothing was taken.
    CreditsNotLoaded,
    /// The request would be refused (or would spend credits) while leases hold units or slots that could
    /// serve it; nothing was taken. Recall the leases, then decide for good.
    HeldElsewhere,
}

/// The script's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub replayed: bool,
    pub quota_used: i64,
    pub quota_limit: i64,
    pub units_from_quota: i64,
    pub credits_taken: i64,
    /// -1 when not loaded.
    pub credits_remaining: i64,
    pub retry_after_ms: u64,
    pub rate_remaining: u32,
    pub rate_reset_ms: u64,
}

impl Decision {
    fn from_reply(reply: &[i64]) -> redis::RedisResult<Self> {
        let [
            verdict,
            replayed,
            used,
            limit,
            from_quota,
            taken,
            remaining,
            retry,
            rate_remaining,
            rate_reset,
        ] = reply
        else {
            return Err(unexpected_reply("admit"));
        };
        let verdict = match verdict {
            1 => Verdict::Admitted,
            2 => Verdict::RateLimited,
            3 => Verdict::QuotaExhausted,
            4 => Verdict::CreditsExhausted,
            5 => Verdict::CreditsNotLoaded,
            6 => Verdict::HeldElsewhere,
            _ => return Err(unexpected_reply("admit")),
        };
        Ok(Self {
            verdict,
            replayed: *replayed == 1,
            quota_used: *used,
            quota_limit: *limit,
            units_from_quota: *from_quota,
            credits_taken: *taken,
            credits_remaining: *remaining,
            retry_after_ms: u64::try_from(*retry).unwrap_or(0),
            rate_remaining: u32::try_from(*rate_remaining).unwrap_or(0),
            rate_reset_ms: u64::try_from(*rate_reset).unwrap_or(0),
        })
    }
}

fn unexpected_reply(script: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected script reply",
        script.to_owned(),
    ))
}

/// What a refund gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Refunded {
    pub refunded: bool,
    pub units: i64,
    pub credits: i64,
}

/// Net spending of one subscription period, sealed for billing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSpend {
    pub subscription: Uuid,
    pub period_start_ms: i64,
    pub units: i64,
    pub credits_micros: i64,
}

/// A customer's sealed outbox: its id (billing applies each entry once by an id derived from it), its
/// number (billing applies the customer's outboxes in increasing numbers, each once; 0 for an outbox sealed
/// before numbering) and the spending in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedOutbox {
    pub id: String,
    pub sequence: i64,
    pub spend: Vec<SealedSpend>,
}

/// What Redis holds about a customer's mirror before a reconciliation asks billing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorState {
    /// Whether a spendable balance is loaded.
    pub loaded: bool,
    /// The mirror's version; a repair is refused when it moved (see `scripts/reconcile.lua`).
    pub version: i64,
    /// The last outbox number sealed.
    pub outbox_sequence: i64,
}

/// billing's figures for one customer, read in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerSnapshot {
    pub balance_micros: i64,
    /// The change-feed sequence the balance is as of.
    pub as_of_sequence: i64,
    /// The last outbox number billing applied.
    pub outbox_sequence: i64,
}

/// What a reconciliation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// The mirror matched the ledger.
    Matched { balance: i64 },
    /// The mirror was set from `before` to `after`.
    Repaired { before: i64, after: i64 },
    /// No balance is loaded (the next admission that needs one loads it).
    NotLoaded,
    /// Something moved the mirror's version since it was read; ask billing again.
    Changed,
}

/// A reconciliation's outcome, and whether billing had applied outboxes Redis no longer knew of (Redis
/// lost writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciliation {
    pub reconciled: Reconciled,
    pub redis_was_behind: bool,
}

/// A period's counters as usage sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageFigures {
    pub units_used: i64,
    pub credits_remaining: i64,
    pub unreported_units: i64,
    pub unreported_credits: i64,
}

/// What Redis says about its durability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    pub aof_enabled: bool,
    pub maxmemory_policy: String,
}

/// Whether an admission may answer `Verdict::HeldElsewhere`, or decides for good (after a recall).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finality {
    MayRecall,
    Final,
}

/// How leases are granted and written off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// A lease's lifetime from its grant (USAGE_LEASE_TTL_MS).
    pub ttl: std::time::Duration,
    /// How long after its deadline an unreturned lease is written off (USAGE_LEASE_GRACE_MS).
    pub grace: std::time::Duration,
    /// How long an admission waits for recalled leases to come back (USAGE_RECALL_WAIT_MS).
    pub recall_wait: std::time::Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            ttl: std::time::Duration::from_millis(2000),
            grace: std::time::Duration::from_millis(1000),
            recall_wait: std::time::Duration::from_millis(100),
        }
    }
}

/// One customer's lease ask from a holder, with the limits billing gave for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub holder: Uuid,
    pub lease: Uuid,
    pub customer: Uuid,
    pub subscription: Uuid,
    pub units_wanted: i64,
    pub slots_wanted: u32,
    pub min_units: i64,
    /// 0: no rate limit.
    pub rate_limit: u32,
    pub rate_period_ms: u32,
    pub burst: u32,
    pub included_units: i64,
    pub overage: Overage,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
}

/// What a lease ask was granted; empty (`quota_units == 0 && credit_units == 0`) when nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseGrant {
    pub replayed: bool,
    pub quota_units: i64,
    pub credit_units: i64,
    pub unit_price_micros: i64,
    pub slots: u32,
    pub first_slot_offset_us: u64,
    pub emission_us: u64,
    pub tolerance_us: u64,
    pub ttl_ms: u64,
    pub quota_used: i64,
    pub quota_limit: i64,
    /// -1 when not loaded.
    pub credits_remaining: i64,
    /// Expired leases of the customer this grant wrote off first.
    pub written_off: u32,
}

impl LeaseGrant {
    /// Tells whether the grant reserved nothing.
    pub fn is_empty(&self) -> bool {
        self.quota_units == 0 && self.credit_units == 0
    }
}

/// A holder giving back one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseReturn {
    pub holder: Uuid,
    pub lease: Uuid,
    pub customer: Uuid,
    pub units_spent: i64,
    pub first_unused_slot: u32,
}

/// What became of a returned lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    Returned {
        units_given_back: i64,
    },
    AlreadyReturned {
        units_given_back: i64,
    },
    /// Written off (now, when `now` is set, or before).
    WrittenOff {
        now: bool,
    },
    Unknown,
    /// More was spent than the lease held; nothing changed.
    Overspent,
}

/// A lease outstanding, as an admission about to recall it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub lease: String,
    pub holder: Uuid,
    /// The lease's deadline, ms since the epoch by Redis's clock.
    pub deadline_ms: i64,
}

/// What one write-off attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOff {
    /// No such lease is outstanding.
    Gone,
    WrittenOff,
    /// Due at this instant (ms since the epoch, Redis's clock).
    NotDue(i64),
}

struct Scripts {
    admit: Script,
    lease_grant: Script,
    lease_return: Script,
    lease_writeoff: Script,
    lease_refund: Script,
    admit_many: Script,
    refund: Script,
    load_credits: Script,
    grant: Script,
    seal: Script,
    ack: Script,
    reconcile: Script,
}

/// usage's counters in Redis.
#[derive(Clone)]
pub struct Counters {
    connection: ConnectionManager,
    keys: Keys,
    scripts: std::sync::Arc<Scripts>,
    leases: LeaseSettings,
}

impl Counters {
    /// Returns counters over `connection` under `keys`, with the scripts loaded into Redis.
    pub async fn new(connection: ConnectionManager, keys: Keys) -> redis::RedisResult<Self> {
        let scripts = Scripts {
            admit: Script::new(concat!(
                include_str!("scripts/admit_core.lua"),
                include_str!("scripts/admit.lua")
            )),
            admit_many: Script::new(concat!(
                include_str!("scripts/admit_core.lua"),
                include_str!("scripts/admit_many.lua")
            )),
            refund: Script::new(include_str!("scripts/refund.lua")),
            lease_grant: Script::new(concat!(
                include_str!("scripts/lease_core.lua"),
                include_str!("scripts/lease_grant.lua")
            )),
            lease_return: Script::new(concat!(
                include_str!("scripts/lease_core.lua"),
                include_str!("scripts/lease_return.lua")
            )),
            lease_writeoff: Script::new(concat!(
                include_str!("scripts/lease_core.lua"),
                include_str!("scripts/lease_writeoff.lua")
            )),
            lease_refund: Script::new(include_str!("scripts/lease_refund.lua")),
            load_credits: Script::new(include_str!("scripts/load_credits.lua")),
            grant: Script::new(include_str!("scripts/grant.lua")),
            seal: Script::new(include_str!("scripts/seal.lua")),
            ack: Script::new(include_str!("scripts/ack.lua")),
            reconcile: Script::new(include_str!("scripts/reconcile.lua")),
        };
        let counters = Self {
            connection,
            keys,
            scripts: std::sync::Arc::new(scripts),
            leases: LeaseSettings::default(),
        };
        counters.load_admit_script().await?;
        Ok(counters)
    }

    /// Returns the key names in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Returns these counters granting leases under `settings` (instead of the defaults).
    pub fn with_lease_settings(mut self, settings: LeaseSettings) -> Self {
        self.leases = settings;
        self
    }

    /// Returns the lease settings in use.
    pub fn lease_settings(&self) -> LeaseSettings {
        self.leases
    }

    async fn load_admit_script(&self) -> redis::RedisResult<()> {
        let mut connection = self.connection.clone();
        for script in [&self.scripts.admit, &self.scripts.admit_many] {
            script.prepare_invoke().load_async(&mut connection).await?;
        }
        Ok(())
    }

    fn admit_invocation<'a>(
        &'a self,
        admission: &Admission,
        finality: Finality,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.scripts.admit.prepare_invoke();
        self.add_admission(&mut invocation, admission, finality);
        invocation
    }

    /// Returns one call deciding several requests of one customer, in order.
    fn admit_many_invocation<'a, 'b>(
        &'a self,
        admissions: impl Iterator<Item = &'b Admission>,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.scripts.admit_many.prepare_invoke();
        for admission in admissions {
            self.add_admission(&mut invocation, admission, Finality::MayRecall);
        }
        invocation
    }

    /// Appends the 6 keys and 12 arguments of one request (see `scripts/admit_core.lua`).
    fn add_admission(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        admission: &Admission,
        finality: Finality,
    ) {
        for key in self.keys.admission(admission) {
            invocation.key(key);
        }
        let (pays_with_credits, unit_price) = match admission.overage {
            Overage::Block => (0, 0),
            Overage::Credits { unit_price_micros } => (1, unit_price_micros),
        };
        invocation
            .arg(admission.units)
            .arg(admission.rate_limit)
            .arg(admission.rate_period_ms)
            .arg(admission.burst)
            .arg(admission.included_units)
            .arg(pays_with_credits)
            .arg(unit_price)
            .arg(admission.period_end_ms)
            .arg(admission.outbox_field())
            .arg(REQUEST_TTL_SECONDS)
            .arg(QUOTA_RETENTION_MS)
            .arg(u8::from(finality == Finality::Final));
    }

    /// Decides one request in one round trip; `Verdict::HeldElsewhere` when leases hold what it needs.
    pub async fn admit(&self, admission: &Admission) -> redis::RedisResult<Decision> {
        self.admit_with(admission, Finality::MayRecall).await
    }

    /// Decides one request for good: never `Verdict::HeldElsewhere` (after a recall).
    pub async fn admit_final(&self, admission: &Admission) -> redis::RedisResult<Decision> {
        self.admit_with(admission, Finality::Final).await
    }

    async fn admit_with(
        &self,
        admission: &Admission,
        finality: Finality,
    ) -> redis::RedisResult<Decision> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .admit_invocation(admission, finality)
            .invoke_async(&mut connection)
            .await?;
        Decision::from_reply(&reply)
    }

    /// Decides many requests in one round trip: one script call per customer (deciding that customer's
    /// requests in order), all calls pipelined. Each element is that request's decision or its own error.
    pub async fn admit_many(
        &self,
        admissions: &[Admission],
    ) -> redis::RedisResult<Vec<redis::RedisResult<Decision>>> {
        if admissions.is_empty() {
            return Ok(Vec::new());
        }
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: std::collections::HashMap<Uuid, usize> =
            std::collections::HashMap::with_capacity(admissions.len());
        for (index, admission) in admissions.iter().enumerate() {
            let group = *group_of.entry(admission.customer).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(index);
        }

        let mut pipeline = redis::pipe();
        // One request's failure (a wrong-typed key) must not fail the others' decisions.
        pipeline.ignore_errors();
        for group in &groups {
            match group.as_slice() {
                [only] => pipeline
                    .invoke_script(&self.admit_invocation(&admissions[*only], Finality::MayRecall)),
                _ => pipeline.invoke_script(
                    &self.admit_many_invocation(group.iter().map(|&index| &admissions[index])),
                ),
            };
        }
        let mut connection = self.connection.clone();
        let replies: Vec<redis::RedisResult<redis::Value>> =
            pipeline.query_async(&mut connection).await?;
        if replies.len() != groups.len() {
            return Err(unexpected_reply("admit"));
        }

        let mut results: Vec<Option<redis::RedisResult<Decision>>> =
            (0..admissions.len()).map(|_| None).collect();
        let mut script_lost = false;
        for (reply, group) in replies.into_iter().zip(&groups) {
            if is_noscript(&reply) {
                // Redis lost its script cache (restart, SCRIPT FLUSH): nothing of a NOSCRIPT call ran,
                // so these requests are decided again below.
                script_lost = true;
                continue;
            }
            let answers: Vec<redis::RedisResult<Vec<i64>>> = match (reply, group.len()) {
                (Ok(value), 1) => vec![redis::from_redis_value(value).map_err(Into::into)],
                (Ok(value), _) => redis::from_redis_value(value)?,
                (Err(error), _) => group.iter().map(|_| Err(error.clone())).collect(),
            };
            if answers.len() != group.len() {
                return Err(unexpected_reply("admit"));
            }
            for (answer, &index) in answers.into_iter().zip(group) {
                results[index] = Some(answer.and_then(|values| Decision::from_reply(&values)));
            }
        }
        if script_lost {
            self.load_admit_script().await?;
        }
        let mut decided = Vec::with_capacity(admissions.len());
        for (result, admission) in results.into_iter().zip(admissions) {
            decided.push(match result {
                Some(result) => result,
                None => self.admit(admission).await,
            });
        }
        Ok(decided)
    }

    /// Loads a customer's spendable balance from billing's figure unless it is loaded; returns the balance.
    pub async fn load_credits(
        &self,
        customer: Uuid,
        balance: i64,
        as_of_sequence: i64,
    ) -> redis::RedisResult<i64> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .scripts
            .load_credits
            .key(self.keys.credits(customer))
            .key(self.keys.pending_grants(customer))
            .arg(balance)
            .arg(as_of_sequence)
            .invoke_async(&mut connection)
            .await?;
        reply
            .get(1)
            .copied()
            .ok_or_else(|| unexpected_reply("load_credits"))
    }

    /// Tells whether the customer's spendable balance is loaded.
    pub async fn credits_loaded(&self, customer: Uuid) -> redis::RedisResult<bool> {
        let mut connection = self.connection.clone();
        redis::cmd("HEXISTS")
            .arg(self.keys.credits(customer))
            .arg("b")
            .query_async(&mut connection)
            .await
    }

    /// Applies a credit change once per reference; returns whether it applied now and the balance (-1 when
    /// not loaded).
    pub async fn grant(
        &self,
        customer: Uuid,
        reference: &str,
        delta_micros: i64,
        sequence: i64,
    ) -> redis::RedisResult<(bool, i64)> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .scripts
            .grant
            .key(self.keys.credits(customer))
            .key(self.keys.pending_grants(customer))
            .key(self.keys.applied_grants(customer))
            .arg(reference)
            .arg(delta_micros)
            .arg(sequence)
            .invoke_async(&mut connection)
            .await?;
        match reply.as_slice() {
            [applied, balance] => Ok((*applied == 1, *balance)),
            _ => Err(unexpected_reply("grant")),
        }
    }

    /// Gives back what the admission of `request_id` took, once.
    pub async fn refund(&self, customer: Uuid, request_id: &str) -> redis::RedisResult<Refunded> {
        let mut connection = self.connection.clone();
        let request_key = self.keys.request(customer, request_id);
        // The record names the quota key it used; the script checks it again, so reading it first is safe.
        let record = loop {
            let record: Option<String> = redis::cmd("GET")
                .arg(&request_key)
                .query_async(&mut connection)
                .await?;
            if let Some(record) = record {
                break record;
            }
            // No admission under this id, or not yet: the gateway refunds whatever it cannot know the
            // outcome of, and its admission may still be on its way (usage slow, the gateway's deadline
            // passed). A tombstone makes that admission, if it comes, a replay of a refusal that takes
            // nothing. Set only if still absent; if the admission won the race, refund it.
            let placed: Option<String> = redis::cmd("SET")
                .arg(&request_key)
                .arg(REFUNDED_BEFORE_ADMISSION)
                .arg("EX")
                .arg(REQUEST_TTL_SECONDS)
                .arg("NX")
                .query_async(&mut connection)
                .await?;
            if placed.is_some() {
                return Ok(Refunded::default());
            }
        };
        if record.rsplit(';').next() == Some("1") {
            return Ok(Refunded::default());
        }
        let Some(quota_key) = record.split(';').nth(4).map(str::to_owned) else {
            return Err(unexpected_reply("refund"));
        };
        if !quota_key.starts_with(&self.keys.customer(customer)) {
            return Err(unexpected_reply("refund"));
        }
        let reply: Vec<i64> = self
            .scripts
            .refund
            .key(&request_key)
            .key(quota_key)
            .key(self.keys.credits(customer))
            .key(self.keys.outbox(customer))
            .invoke_async(&mut connection)
            .await?;
        match reply.as_slice() {
            [refunded, units, credits] => Ok(Refunded {
                refunded: *refunded == 1,
                units: *units,
                credits: *credits,
            }),
            _ => Err(unexpected_reply("refund")),
        }
    }

    /// Seals the customer's outbox (or returns the one sealed before and not yet acknowledged); `None` when
    /// there is nothing to report.
    pub async fn seal(&self, customer: Uuid) -> redis::RedisResult<Option<SealedOutbox>> {
        let mut connection = self.connection.clone();
        let fields: Vec<String> = self
            .scripts
            .seal
            .key(self.keys.outbox(customer))
            .key(self.keys.sealed(customer))
            .key(self.keys.credits(customer))
            .arg(Uuid::new_v4().to_string())
            .invoke_async(&mut connection)
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut id = None;
        let mut sequence = 0;
        let mut spend: Vec<SealedSpend> = Vec::new();
        for pair in fields.chunks_exact(2) {
            let (field, value) = (&pair[0], &pair[1]);
            if field == "_id" {
                id = Some(value.clone());
                continue;
            }
            if field == "_n" {
                sequence = value.parse().map_err(|_| unexpected_reply("seal"))?;
                continue;
            }
            let amount: i64 = value.parse().map_err(|_| unexpected_reply("seal"))?;
            let mut parts = field.splitn(3, '|');
            let (Some(kind), Some(subscription), Some(period)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(unexpected_reply("seal"));
            };
            let subscription =
                Uuid::parse_str(subscription).map_err(|_| unexpected_reply("seal"))?;
            let period_start_ms: i64 = period.parse().map_err(|_| unexpected_reply("seal"))?;
            let index = match spend.iter().position(|item| {
                item.subscription == subscription && item.period_start_ms == period_start_ms
            }) {
                Some(index) => index,
                None => {
                    spend.push(SealedSpend {
                        subscription,
                        period_start_ms,
                        units: 0,
                        credits_micros: 0,
                    });
                    spend.len() - 1
                }
            };
            match kind {
                "u" => spend[index].units += amount,
                "c" => spend[index].credits_micros += amount,
                _ => return Err(unexpected_reply("seal")),
            }
        }
        let id = id.ok_or_else(|| unexpected_reply("seal"))?;
        spend.retain(|item| item.units != 0 || item.credits_micros != 0);
        Ok(Some(SealedOutbox {
            id,
            sequence,
            spend,
        }))
    }

    /// Drops the customer's sealed outbox `id` after billing acknowledged it, and catches the customer's
    /// outbox number up with `billed_sequence` (the last one billing applied; 0 when unknown). Returns
    /// whether billing was ahead of Redis, i.e. Redis lost writes and the mirror needs reconciling.
    pub async fn acknowledge(
        &self,
        customer: Uuid,
        id: &str,
        billed_sequence: i64,
    ) -> redis::RedisResult<bool> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .scripts
            .ack
            .key(self.keys.sealed(customer))
            .key(self.keys.credits(customer))
            .arg(id)
            .arg(billed_sequence)
            .invoke_async(&mut connection)
            .await?;
        match reply.as_slice() {
            [_, behind] => Ok(*behind == 1),
            _ => Err(unexpected_reply("ack")),
        }
    }

    /// Reads what a reconciliation compares against billing's snapshot; `None` when Redis holds nothing
    /// of the customer's credits.
    pub async fn mirror_state(&self, customer: Uuid) -> redis::RedisResult<Option<MirrorState>> {
        let mut connection = self.connection.clone();
        let (balance, version, sequence): (Option<i64>, Option<i64>, Option<i64>) =
            redis::cmd("HMGET")
                .arg(self.keys.credits(customer))
                .arg("b")
                .arg("v")
                .arg("n")
                .query_async(&mut connection)
                .await?;
        if balance.is_none() && sequence.is_none() {
            return Ok(None);
        }
        Ok(Some(MirrorState {
            loaded: balance.is_some(),
            version: version.unwrap_or(0),
            outbox_sequence: sequence.unwrap_or(0),
        }))
    }

    /// Sets the customer's mirror to the ledger balance less the credits not yet charged in it, unless the
    /// mirror's version moved from `version` (then `Reconciled::Changed`: read again and retry). `ledger`
    /// must have been read after `version`.
    pub async fn reconcile_credits(
        &self,
        customer: Uuid,
        version: i64,
        ledger: LedgerSnapshot,
    ) -> redis::RedisResult<Reconciliation> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .scripts
            .reconcile
            .key(self.keys.credits(customer))
            .key(self.keys.outbox(customer))
            .key(self.keys.sealed(customer))
            .key(self.keys.leases(customer))
            .arg(version)
            .arg(ledger.balance_micros)
            .arg(ledger.as_of_sequence)
            .arg(ledger.outbox_sequence)
            .invoke_async(&mut connection)
            .await?;
        let [status, before, after, behind] = reply.as_slice() else {
            return Err(unexpected_reply("reconcile"));
        };
        let reconciled = match status {
            0 => Reconciled::Matched { balance: *before },
            1 => Reconciled::Repaired {
                before: *before,
                after: *after,
            },
            2 => Reconciled::NotLoaded,
            3 => Reconciled::Changed,
            _ => return Err(unexpected_reply("reconcile")),
        };
        Ok(Reconciliation {
            reconciled,
            redis_was_behind: *behind == 1,
        })
    }

    /// Returns one `SCAN` step over the customers' credits hashes: the cursor to continue from (0 when the
    /// pass is complete) and the customers found (possibly none, possibly repeated across steps).
    pub async fn scan_customers_with_credits(
        &self,
        cursor: u64,
        count: usize,
    ) -> redis::RedisResult<(u64, Vec<Uuid>)> {
        let mut connection = self.connection.clone();
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(self.keys.credits_pattern())
            .arg("COUNT")
            .arg(count)
            .query_async(&mut connection)
            .await?;
        Ok((
            next,
            keys.iter()
                .filter_map(|key| self.keys.customer_of_credits(key))
                .collect(),
        ))
    }

    /// Returns every customer with an open or sealed outbox (a full `SCAN`; for start-up and a slow sweep
    /// that catches what another replica left behind).
    pub async fn customers_with_outboxes(&self) -> redis::RedisResult<Vec<Uuid>> {
        let mut connection = self.connection.clone();
        let pattern = self.keys.outbox_pattern();
        let mut cursor: u64 = 0;
        let mut customers = std::collections::BTreeSet::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            customers.extend(
                keys.iter()
                    .filter_map(|key| self.keys.customer_of_outbox(key)),
            );
            if next == 0 {
                return Ok(customers.into_iter().collect());
            }
            cursor = next;
        }
    }

    /// Returns one period's counters and the customer's credits as usage sees them now.
    pub async fn usage(
        &self,
        customer: Uuid,
        subscription: Uuid,
        period_start_ms: i64,
    ) -> redis::RedisResult<UsageFigures> {
        let mut connection = self.connection.clone();
        let field = format!("{subscription}|{period_start_ms}");
        let figures: [Option<i64>; 6] = redis::pipe()
            .get(self.keys.quota(customer, subscription, period_start_ms))
            .hget(self.keys.credits(customer), "b")
            .hget(self.keys.outbox(customer), format!("u|{field}"))
            .hget(self.keys.outbox(customer), format!("c|{field}"))
            .hget(self.keys.sealed(customer), format!("u|{field}"))
            .hget(self.keys.sealed(customer), format!("c|{field}"))
            .query_async(&mut connection)
            .await?;
        let [
            used,
            balance,
            open_units,
            open_credits,
            sealed_units,
            sealed_credits,
        ] = figures;
        Ok(UsageFigures {
            units_used: used.unwrap_or(0),
            credits_remaining: balance.unwrap_or(-1),
            unreported_units: open_units.unwrap_or(0) + sealed_units.unwrap_or(0),
            unreported_credits: open_credits.unwrap_or(0) + sealed_credits.unwrap_or(0),
        })
    }

    /// Reads whether Redis keeps an append-only file and how it evicts under memory pressure.
    pub async fn durability(&self) -> redis::RedisResult<Durability> {
        let mut connection = self.connection.clone();
        let persistence: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut connection)
            .await?;
        let memory: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut connection)
            .await?;
        let field = |info: &str, name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        Ok(Durability {
            aof_enabled: field(&persistence, "aof_enabled").as_deref() == Some("1"),
            maxmemory_policy: field(&memory, "maxmemory_policy").unwrap_or_default(),
        })
    }

    /// Reads and writes a small value under the deployment prefix (the billing feed cursor).
    pub async fn feed_cursor(&self) -> redis::RedisResult<i64> {
        let mut connection = self.connection.clone();
        let cursor: Option<i64> = redis::cmd("GET")
            .arg(format!("{}:feed_cursor", self.keys.prefix))
            .query_async(&mut connection)
            .await?;
        Ok(cursor.unwrap_or(0))
    }

    /// Stores the billing feed cursor (never moving it backwards).
    pub async fn store_feed_cursor(&self, sequence: i64) -> redis::RedisResult<()> {
        let mut connection = self.connection.clone();
        let key = format!("{}:feed_cursor", self.keys.prefix);
        let _: redis::Value = redis::cmd("SET")
            .arg(&key)
            .arg(sequence)
            .query_async(&mut connection)
            .await?;
        Ok(())
    }
}

impl Counters {
    /// Grants one lease (see `scripts/lease_grant.lua`); the lease is entered in `P:leases` first, so a
    /// grant whose answer is lost is still written off in time.
    pub async fn grant_lease(&self, ask: &LeaseAsk) -> redis::RedisResult<LeaseGrant> {
        let mut connection = self.connection.clone();
        let member = format!("{}/{}", ask.customer, ask.lease);
        let due_ms = epoch_ms() + duration_ms(self.leases.ttl) + duration_ms(self.leases.grace);
        let _: i64 = redis::cmd("ZADD")
            .arg(self.keys.lease_deadlines())
            .arg(due_ms)
            .arg(&member)
            .query_async(&mut connection)
            .await?;
        let (pays_with_credits, unit_price) = match ask.overage {
            Overage::Block => (0, 0),
            Overage::Credits { unit_price_micros } => (1, unit_price_micros),
        };
        let customer = ask.customer;
        let reply: Vec<i64> = self
            .scripts
            .lease_grant
            .key(self.keys.leases(customer))
            .key(self.keys.lease_grant(customer, ask.lease))
            .key(self.keys.rate(customer))
            .key(
                self.keys
                    .quota(customer, ask.subscription, ask.period_start_ms),
            )
            .key(self.keys.credits(customer))
            .arg(ask.holder.to_string())
            .arg(ask.lease.to_string())
            .arg(ask.units_wanted)
            .arg(ask.slots_wanted)
            .arg(ask.min_units)
            .arg(ask.rate_limit)
            .arg(ask.rate_period_ms)
            .arg(ask.burst)
            .arg(ask.included_units)
            .arg(pays_with_credits)
            .arg(unit_price)
            .arg(ask.period_end_ms)
            .arg(duration_ms(self.leases.ttl))
            .arg(duration_ms(self.leases.grace))
            .arg(REQUEST_TTL_SECONDS)
            .arg(QUOTA_RETENTION_MS)
            .arg(self.keys.customer(customer))
            .arg(format!("{}|{}", ask.subscription, ask.period_start_ms))
            .invoke_async(&mut connection)
            .await?;
        let grant = lease_grant_from_reply(&reply)?;
        if grant.is_empty() && !grant.replayed {
            let _: i64 = redis::cmd("ZREM")
                .arg(self.keys.lease_deadlines())
                .arg(&member)
                .query_async(&mut connection)
                .await?;
        }
        Ok(grant)
    }

    /// Returns one lease (see `scripts/lease_return.lua`), then takes it out of `P:leases` and announces
    /// the return on `P:returned`.
    pub async fn return_lease(&self, lease: &LeaseReturn) -> redis::RedisResult<LeaseOutcome> {
        let mut connection = self.connection.clone();
        let customer = lease.customer;
        let reply: Vec<i64> = self
            .scripts
            .lease_return
            .key(self.keys.leases(customer))
            .key(self.keys.lease_returned(customer, lease.lease))
            .key(self.keys.rate(customer))
            .key(self.keys.credits(customer))
            .key(self.keys.outbox(customer))
            .arg(lease.lease.to_string())
            .arg(lease.holder.to_string())
            .arg(lease.units_spent)
            .arg(lease.first_unused_slot)
            .arg(duration_ms(self.leases.grace))
            .arg(REQUEST_TTL_SECONDS)
            .invoke_async(&mut connection)
            .await?;
        let outcome = match reply.as_slice() {
            [1, given_back, _] => LeaseOutcome::Returned {
                units_given_back: *given_back,
            },
            [2, given_back, _] => LeaseOutcome::AlreadyReturned {
                units_given_back: *given_back,
            },
            [3, _, now] => LeaseOutcome::WrittenOff { now: *now == 1 },
            [4, _, _] => LeaseOutcome::Unknown,
            [5, _, _] => LeaseOutcome::Overspent,
            _ => return Err(unexpected_reply("lease_return")),
        };
        if matches!(
            outcome,
            LeaseOutcome::Returned { .. } | LeaseOutcome::WrittenOff { now: true }
        ) {
            let _: i64 = redis::cmd("ZREM")
                .arg(self.keys.lease_deadlines())
                .arg(format!("{customer}/{}", lease.lease))
                .query_async(&mut connection)
                .await?;
            self.announce_returned(customer).await?;
        }
        Ok(outcome)
    }

    /// Returns up to `limit` entries of `P:leases` due by `now_ms` (this host's clock), as (customer,
    /// lease) pairs; entries that do not parse are dropped from the set.
    pub async fn leases_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> redis::RedisResult<Vec<(Uuid, Uuid)>> {
        let mut connection = self.connection.clone();
        let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.lease_deadlines())
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut connection)
            .await?;
        let mut due = Vec::with_capacity(members.len());
        for member in members {
            match parse_lease_member(&member) {
                Some(pair) => due.push(pair),
                None => {
                    let _: i64 = redis::cmd("ZREM")
                        .arg(self.keys.lease_deadlines())
                        .arg(&member)
                        .query_async(&mut connection)
                        .await?;
                }
            }
        }
        Ok(due)
    }

    /// Writes off `lease` of `customer` when its deadline and grace passed (see
    /// `scripts/lease_writeoff.lua`), and keeps `P:leases` in step: the entry goes unless the lease is not
    /// due yet, in which case it moves to when it is.
    pub async fn write_off_lease(
        &self,
        customer: Uuid,
        lease: Uuid,
    ) -> redis::RedisResult<WriteOff> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .scripts
            .lease_writeoff
            .key(self.keys.leases(customer))
            .key(self.keys.credits(customer))
            .key(self.keys.lease_returned(customer, lease))
            .arg(lease.to_string())
            .arg(duration_ms(self.leases.grace))
            .arg(REQUEST_TTL_SECONDS)
            .invoke_async(&mut connection)
            .await?;
        let outcome = match reply.as_slice() {
            [0] => WriteOff::Gone,
            [1] => WriteOff::WrittenOff,
            [2, due_ms] => WriteOff::NotDue(*due_ms),
            _ => return Err(unexpected_reply("lease_writeoff")),
        };
        let member = format!("{customer}/{lease}");
        match outcome {
            WriteOff::NotDue(due_ms) => {
                let _: i64 = redis::cmd("ZADD")
                    .arg(self.keys.lease_deadlines())
                    .arg(due_ms)
                    .arg(&member)
                    .query_async(&mut connection)
                    .await?;
            }
            WriteOff::Gone | WriteOff::WrittenOff => {
                let _: i64 = redis::cmd("ZREM")
                    .arg(self.keys.lease_deadlines())
                    .arg(&member)
                    .query_async(&mut connection)
                    .await?;
            }
        }
        if outcome == WriteOff::WrittenOff {
            self.announce_returned(customer).await?;
        }
        Ok(outcome)
    }

    /// Refunds `units` of request `request_id` admitted from `lease` after the lease was returned, once
    /// per request id (see `scripts/lease_refund.lua`).
    pub async fn refund_from_lease(
        &self,
        customer: Uuid,
        lease: Uuid,
        request_id: &str,
        units: i64,
    ) -> redis::RedisResult<Refunded> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .scripts
            .lease_refund
            .key(self.keys.lease_returned(customer, lease))
            .key(self.keys.lease_refund(customer, request_id))
            .key(self.keys.credits(customer))
            .key(self.keys.outbox(customer))
            .arg(units)
            .arg(REQUEST_TTL_SECONDS)
            .invoke_async(&mut connection)
            .await?;
        match reply.as_slice() {
            [refunded, units, credits] => Ok(Refunded {
                refunded: *refunded == 1,
                units: *units,
                credits: *credits,
            }),
            _ => Err(unexpected_reply("lease_refund")),
        }
    }

    /// Returns the customer's outstanding leases (for a recall).
    pub async fn held_leases(&self, customer: Uuid) -> redis::RedisResult<Vec<HeldLease>> {
        let mut connection = self.connection.clone();
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.keys.leases(customer))
            .query_async(&mut connection)
            .await?;
        Ok(fields
            .iter()
            .filter(|(lease, _)| !lease.starts_with('_'))
            .filter_map(|(lease, record)| parse_held_lease(lease, record))
            .collect())
    }

    /// Publishes a recall of `customer`'s leases held by `holders` to every usage replica.
    pub async fn publish_recall(&self, customer: Uuid, holders: &[Uuid]) -> redis::RedisResult<()> {
        let mut connection = self.connection.clone();
        let mut message = customer.to_string();
        for holder in holders {
            message.push(' ');
            message.push_str(&holder.to_string());
        }
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.recall_channel())
            .arg(message)
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    async fn announce_returned(&self, customer: Uuid) -> redis::RedisResult<()> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.returned_channel())
            .arg(customer.to_string())
            .query_async(&mut connection)
            .await?;
        Ok(())
    }
}

fn lease_grant_from_reply(reply: &[i64]) -> redis::RedisResult<LeaseGrant> {
    let [
        replayed,
        quota_units,
        credit_units,
        unit_price,
        slots,
        offset_us,
        emission_us,
        tolerance_us,
        ttl_ms,
        quota_used,
        quota_limit,
        credits_remaining,
        written_off,
    ] = reply
    else {
        return Err(unexpected_reply("lease_grant"));
    };
    let unsigned = |value: &i64| u64::try_from(*value).map_err(|_| unexpected_reply("lease_grant"));
    Ok(LeaseGrant {
        replayed: *replayed == 1,
        quota_units: *quota_units,
        credit_units: *credit_units,
        unit_price_micros: *unit_price,
        slots: u32::try_from(*slots).map_err(|_| unexpected_reply("lease_grant"))?,
        first_slot_offset_us: unsigned(offset_us)?,
        emission_us: unsigned(emission_us)?,
        tolerance_us: unsigned(tolerance_us)?,
        ttl_ms: unsigned(ttl_ms)?,
        quota_used: *quota_used,
        quota_limit: *quota_limit,
        credits_remaining: *credits_remaining,
        written_off: u32::try_from(*written_off).unwrap_or(0),
    })
}

/// Parses a `P:leases` member, "<customer>/<lease id>".
fn parse_lease_member(member: &str) -> Option<(Uuid, Uuid)> {
    let (customer, lease) = member.split_once('/')?;
    Some((
        Uuid::parse_str(customer).ok()?,
        Uuid::parse_str(lease).ok()?,
    ))
}

/// Parses the holder and deadline of a lease record (`scripts/lease_core.lua`).
fn parse_held_lease(lease: &str, record: &str) -> Option<HeldLease> {
    let fields: Vec<&str> = record.split(';').collect();
    Some(HeldLease {
        lease: lease.to_owned(),
        holder: Uuid::parse_str(fields.first()?).ok()?,
        deadline_ms: fields.get(8)?.parse().ok()?,
    })
}

fn duration_ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, duration_ms)
}

fn is_noscript<T>(reply: &redis::RedisResult<T>) -> bool {
    matches!(reply, Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_members_and_records_parse_back() {
        let customer = Uuid::new_v4();
        let lease = Uuid::new_v4();
        let holder = Uuid::new_v4();
        let record =
            format!("{holder};10;0;0;5;1000;20000;101000;1764000000000;pg:{{c:x}}:q:s:0;s|0");

        assert_eq!(
            parse_lease_member(&format!("{customer}/{lease}")),
            Some((customer, lease))
        );
        assert_eq!(parse_lease_member("not-a-member"), None);
        assert_eq!(
            parse_held_lease("l-1", &record),
            Some(HeldLease {
                lease: "l-1".to_owned(),
                holder,
                deadline_ms: 1_764_000_000_000,
            })
        );
    }

    #[test]
    fn a_grant_reply_parses_and_a_negative_slot_figure_is_refused() {
        let reply = [
            0, 50, 0, 0, 4, 2_000, 100_000, 1_000_000, 2_000, 50, 100, -1, 1,
        ];

        let grant = lease_grant_from_reply(&reply).expect("a valid reply");
        let broken = lease_grant_from_reply(&[
            0, 50, 0, 0, 4, -5, 100_000, 1_000_000, 2_000, 50, 100, -1, 0,
        ]);

        assert_eq!(grant.quota_units, 50);
        assert_eq!(
            (
                grant.slots,
                grant.first_slot_offset_us,
                grant.emission_us,
                grant.tolerance_us
            ),
            (4, 2_000, 100_000, 1_000_000)
        );
        assert_eq!((grant.credits_remaining, grant.written_off), (-1, 1));
        assert!(!grant.is_empty() && !grant.replayed);
        assert!(broken.is_err());
    }

    #[test]
    fn outbox_keys_name_their_customer_and_nothing_else_matches() {
        let keys = Keys::new("pg");
        let customer = Uuid::new_v4();

        assert_eq!(
            keys.customer_of_outbox(&keys.outbox(customer)),
            Some(customer)
        );
        assert_eq!(
            keys.customer_of_outbox(&keys.sealed(customer)),
            Some(customer)
        );
        assert_eq!(keys.customer_of_outbox(&keys.credits(customer)), None);
        assert_eq!(
            keys.customer_of_outbox(&format!("other:{{c:{customer}}}:ob")),
            None
        );
    }

    #[test]
    fn credits_keys_name_their_customer_and_nothing_else_matches() {
        let keys = Keys::new("pg");
        let customer = Uuid::new_v4();

        assert_eq!(
            keys.customer_of_credits(&keys.credits(customer)),
            Some(customer)
        );
        assert_eq!(keys.customer_of_credits(&keys.outbox(customer)), None);
        assert_eq!(
            keys.customer_of_credits(&format!("pgx:{{c:{customer}}}:cr")),
            None
        );
    }

    #[test]
    fn every_key_of_a_customer_carries_the_same_hash_tag() {
        let keys = Keys::new("pg");
        let customer = Uuid::new_v4();
        let tag = format!("{{c:{customer}}}");

        let all = [
            keys.rate(customer),
            keys.quota(customer, Uuid::new_v4(), 0),
            keys.credits(customer),
            keys.pending_grants(customer),
            keys.applied_grants(customer),
            keys.request(customer, "r-1"),
            keys.outbox(customer),
            keys.sealed(customer),
            keys.leases(customer),
            keys.lease_grant(customer, Uuid::new_v4()),
            keys.lease_returned(customer, Uuid::new_v4()),
            keys.lease_refund(customer, "r-1"),
        ];

        assert!(
            all.iter()
                .all(|key| key.contains(&tag) && key.find('{') == key.find(&tag))
        );
    }
}
