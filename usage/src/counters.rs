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

    /// Returns every key an admission of `admission` may touch, in the admit script's order.
    pub fn admission(&self, admission: &Admission) -> [String; 5] {
        let customer = admission.customer;
        [
            self.rate(customer),
            self.quota(customer, admission.subscription, admission.period_start_ms),
            self.credits(customer),
            self.request(customer, &admission.request_id),
            self.outbox(customer),
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

struct Scripts {
    admit: Script,
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
        };
        counters.load_admit_script().await?;
        Ok(counters)
    }

    /// Returns the key names in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn load_admit_script(&self) -> redis::RedisResult<()> {
        let mut connection = self.connection.clone();
        for script in [&self.scripts.admit, &self.scripts.admit_many] {
            script.prepare_invoke().load_async(&mut connection).await?;
        }
        Ok(())
    }

    fn admit_invocation<'a>(&'a self, admission: &Admission) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.scripts.admit.prepare_invoke();
        self.add_admission(&mut invocation, admission);
        invocation
    }

    /// Returns one call deciding several requests of one customer, in order.
    fn admit_many_invocation<'a, 'b>(
        &'a self,
        admissions: impl Iterator<Item = &'b Admission>,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.scripts.admit_many.prepare_invoke();
        for admission in admissions {
            self.add_admission(&mut invocation, admission);
        }
        invocation
    }

    /// Appends the 5 keys and 11 arguments of one request (see `scripts/admit_core.lua`).
    fn add_admission(&self, invocation: &mut redis::ScriptInvocation<'_>, admission: &Admission) {
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
            .arg(QUOTA_RETENTION_MS);
    }

    /// Decides one request in one round trip.
    pub async fn admit(&self, admission: &Admission) -> redis::RedisResult<Decision> {
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self
            .admit_invocation(admission)
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
                [only] => pipeline.invoke_script(&self.admit_invocation(&admissions[*only])),
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

fn is_noscript<T>(reply: &redis::RedisResult<T>) -> bool {
    matches!(reply, Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ];

        assert!(
            all.iter()
                .all(|key| key.contains(&tag) && key.find('{') == key.find(&tag))
        );
    }
}
