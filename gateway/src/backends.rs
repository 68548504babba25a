//! The gateway's calls to billing and usage: each with a deadline and behind a circuit breaker, so an
//! outage costs one fast failure per request instead of a timeout per request.
//!
//! The breaker opens after `FAILURES_TO_OPEN` consecutive failures. While it is open, calls fail at once
//! and a background probe asks the backend's gRPC health every `PROBE_INTERVAL`; the first SERVING answer
//! closes it, so traffic resumes within a probe interval of the backend's return (DESIGN §2, outages).
//!
//! Admissions are batched without waiting: a request goes to usage at once while fewer than
//! `BATCHES_IN_FLIGHT` batches are out; otherwise it waits for one to come back and goes with everything
//! else that queued meanwhile, in one `AdmitBatch`. Under load that turns many small gRPC calls and Redis
//! round trips into few large ones; when idle every request travels alone, so batching adds no delay.
//!
//! Whenever an admission's outcome is unknown (the call failed or timed out after it was sent, or its
//! caller stopped waiting), the gateway refunds it by request id: a refund of an id usage never admitted
//! changes nothing, so a customer is never charged for a request that was not served.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tonic::{Code, Request, service::interceptor::InterceptedService, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use proto::{
    auth::BearerToken,
    billing::v1::{self as billing_pb, entitlements_client::EntitlementsClient},
    usage::v1::{self as usage_pb, usage_client::UsageClient},
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    decision::{Admission, AdmissionDecision, AdmissionOutcome},
    entitlements::{Entitlement, Limits, Overage, Standing},
    leases::{Grant, GrantFigures, LeaseToReturn, Slots, Wanted},
};

/// A client of billing's internal API, carrying the service token.
pub type BillingClient = EntitlementsClient<InterceptedService<Channel, BearerToken>>;
/// A client of usage's API, carrying the service token.
pub type UsageApiClient = UsageClient<InterceptedService<Channel, BearerToken>>;

/// Consecutive failures that open a breaker.
const FAILURES_TO_OPEN: u32 = 3;
/// How often an open breaker's probe asks the backend's health.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long one probe waits for its answer.
const PROBE_DEADLINE: Duration = Duration::from_millis(200);

/// A circuit breaker for one backend.
pub struct Breaker {
    backend: &'static str,
    failures: AtomicU32,
    open: AtomicBool,
    opened_at: Mutex<Option<Instant>>,
    /// What the last failure was, in words an operator can act on.
    cause: Mutex<Option<String>>,
    /// Wakes the probe when the breaker opens; the probe ends when this is dropped.
    state: watch::Sender<bool>,
}

impl Breaker {
    /// Returns a closed breaker for `backend` and starts its probe, which asks `health` about `service`.
    fn start(backend: &'static str, health: Channel, service: &'static str) -> Arc<Self> {
        let (state, open) = watch::channel(false);
        let breaker = Arc::new(Self {
            backend,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            opened_at: Mutex::new(None),
            cause: Mutex::new(None),
            state,
        });
        tokio::spawn(probe(
            open,
            Arc::downgrade(&breaker),
            HealthClient::new(health),
            service,
        ));
        breaker
    }

    /// Tells whether a call may go out now.
    pub fn permitted(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    /// Tells whether the breaker is open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Returns what the last failure was while the breaker is open (for example that the backend's TLS
    /// certificate was not trusted), `None` while it is closed.
    pub fn cause(&self) -> Option<String> {
        if !self.is_open() {
            return None;
        }
        lock(&self.cause).clone()
    }

    fn on_success(&self) {
        self.failures.store(0, Ordering::Release);
    }

    fn on_error(&self, status: &tonic::Status) {
        let cause = describe_failure(status);
        *lock(&self.cause) = Some(cause.clone());
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= FAILURES_TO_OPEN && !self.open.swap(true, Ordering::AcqRel) {
            *self
                .opened_at
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
            metrics::gauge!("paygate_gateway_breaker_open", "backend" => self.backend).set(1.0);
            tracing::warn!(
                backend = self.backend,
                failures,
                %cause,
                "backend failing; breaker open, answering 503 at once and probing its health"
            );
            self.state.send_replace(true);
        }
    }

    fn close(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            let open_for = self
                .opened_at
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
                .map_or(0, |opened| opened.elapsed().as_millis());
            metrics::gauge!("paygate_gateway_breaker_open", "backend" => self.backend).set(0.0);
            tracing::info!(
                backend = self.backend,
                open_for_ms = open_for as u64,
                "backend serving again; breaker closed"
            );
        }
        self.state.send_replace(false);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Describes a failed call for logs and readiness: a TLS certificate the gateway does not trust is named as
/// such, with the setting to check, rather than as a bare transport error.
pub fn describe_failure(status: &tonic::Status) -> String {
    match proto::tls::certificate_rejection(status) {
        Some(reason) => {
            format!("its TLS certificate was not trusted (check PAYGATE_GRPC_CA_FILE): {reason}")
        }
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// Waits for `breaker` to open, then asks the backend's health every `PROBE_INTERVAL` until it answers
/// SERVING, and closes the breaker. Ends when the breaker is dropped.
async fn probe(
    mut open: watch::Receiver<bool>,
    breaker: Weak<Breaker>,
    mut health: HealthClient<Channel>,
    service: &'static str,
) {
    loop {
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        loop {
            let mut request = Request::new(HealthCheckRequest {
                service: service.to_owned(),
            });
            request.set_timeout(PROBE_DEADLINE);
            let answer = tokio::time::timeout(PROBE_DEADLINE, health.check(request)).await;
            let serving = matches!(
                &answer,
                Ok(Ok(answer)) if answer.get_ref().status() == ServingStatus::Serving
            );
            let Some(breaker) = breaker.upgrade() else {
                return;
            };
            match &answer {
                Ok(Err(status)) => *lock(&breaker.cause) = Some(describe_failure(status)),
                Ok(Ok(answer)) if !serving => {
                    *lock(&breaker.cause) = Some(format!(
                        "its health answers {:?}",
                        answer.get_ref().status()
                    ));
                }
                _ => {}
            }
            if serving {
                breaker.close();
                break;
            }
            if !breaker.is_open() {
                break;
            }
            drop(breaker);
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

/// Why a backend call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The breaker is open: the backend failed recently and is not asked now.
    #[error("circuit open")]
    CircuitOpen,
    /// The call failed or ran out of time.
    #[error("call failed: {0}")]
    Failed(tonic::Status),
}

impl BackendError {
    /// Returns the `kind` label of `paygate_gateway_backend_errors_total` for this error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CircuitOpen => "circuit_open",
            Self::Failed(status) if status.code() == Code::DeadlineExceeded => "deadline",
            Self::Failed(_) => "failed",
        }
    }
}

/// Most admissions one `AdmitBatch` carries (usage accepts up to 1,000).
const MAX_BATCH: usize = 256;
/// Admission batches out at once; two per core of a small gateway keeps both usage's cores busy.
const BATCHES_IN_FLIGHT: usize = 4;

/// An admission waiting for its batch, and where its answer goes.
struct PendingAdmission {
    request: usage_pb::AdmitRequest,
    answer: oneshot::Sender<Result<usage_pb::AdmitResponse, BackendError>>,
    /// The trace of the request asking; a batch travels in its first request's trace, linked to the
    /// others'.
    trace: opentelemetry::Context,
}

/// billing and usage, as the decision path calls them.
#[derive(Clone)]
pub struct Backends {
    billing: BillingClient,
    usage: UsageApiClient,
    billing_breaker: Arc<Breaker>,
    usage_breaker: Arc<Breaker>,
    deadline: Duration,
    admissions: mpsc::UnboundedSender<PendingAdmission>,
}

/// Returns a lazily connecting channel to `url`: plaintext for `http://`, TLS verified against the system
/// roots for `https://`.
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    channel_trusting(url, None)
}

/// Returns a lazily connecting channel to `url`: plaintext for `http://`, TLS for `https://` verified
/// against `ca` (`PAYGATE_GRPC_CA_FILE`), or the system roots when `ca` is `None`. The breaker's health
/// probe shares the channel, so it speaks TLS too.
pub fn channel_trusting(
    url: &str,
    ca: Option<&tonic::transport::Certificate>,
) -> anyhow::Result<Channel> {
    use anyhow::Context;

    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("`{url}` is not a valid URL"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(proto::tls::trust(endpoint, ca)
        .with_context(|| format!("`{url}`: TLS settings"))?
        .connect_lazy())
}

impl Backends {
    /// Returns backends over the two channels, sending `token`, giving each call `deadline`. Starts the
    /// admission batcher on the current Tokio runtime; it stops when the last clone is dropped.
    pub fn new(billing: Channel, usage: Channel, token: BearerToken, deadline: Duration) -> Self {
        let usage_breaker = Breaker::start("usage", usage.clone(), "usage.v1.Usage");
        let billing_breaker = Breaker::start("billing", billing.clone(), "billing.v1.Entitlements");
        let usage = UsageClient::with_interceptor(usage, token.clone());
        let (admissions, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_admissions(
            queue,
            usage.clone(),
            usage_breaker.clone(),
            deadline,
        ));
        Self {
            billing: EntitlementsClient::with_interceptor(billing, token),
            usage,
            billing_breaker,
            usage_breaker,
            deadline,
            admissions,
        }
    }

    /// Returns why billing is not being asked while its breaker is open (`None` while it is closed).
    pub fn billing_failing_because(&self) -> Option<String> {
        self.billing_breaker.cause()
    }

    /// Returns why usage is not being asked while its breaker is open (`None` while it is closed).
    pub fn usage_failing_because(&self) -> Option<String> {
        self.usage_breaker.cause()
    }

    /// Returns the billing client (for the change stream, which has no deadline).
    pub fn billing(&self) -> BillingClient {
        self.billing.clone()
    }

    /// Returns the usage client (for readiness checks, which set their own deadline).
    pub fn usage(&self) -> UsageApiClient {
        self.usage.clone()
    }

    /// Tells whether billing's circuit breaker is open.
    pub fn billing_breaker_open(&self) -> bool {
        self.billing_breaker.is_open()
    }

    /// Tells whether usage's circuit breaker is open.
    pub fn usage_breaker_open(&self) -> bool {
        self.usage_breaker.is_open()
    }

    /// Resolves a key digest: `Ok(None)` when billing does not know it (or it is revoked or expired).
    pub async fn resolve(&self, digest: [u8; 32]) -> Result<Option<Entitlement>, BackendError> {
        if !self.billing_breaker.permitted() {
            return Err(BackendError::CircuitOpen);
        }
        let mut request = Request::new(billing_pb::ResolveRequest {
            key_digest: digest.to_vec(),
        });
        request.set_timeout(self.deadline);
        telemetry::traces::inject_into_metadata(
            &telemetry::traces::current(),
            request.metadata_mut(),
        );
        let outcome =
            tokio::time::timeout(self.deadline, self.billing.clone().resolve(request)).await;
        match outcome {
            Ok(Ok(answer)) => {
                self.billing_breaker.on_success();
                Ok(Some(entitlement_from_proto(answer.into_inner())))
            }
            Ok(Err(status)) if status.code() == Code::NotFound => {
                self.billing_breaker.on_success();
                Ok(None)
            }
            Ok(Err(status)) => {
                self.billing_breaker.on_error(&status);
                Err(BackendError::Failed(status))
            }
            Err(_) => {
                let status = tonic::Status::deadline_exceeded("billing did not answer in time");
                self.billing_breaker.on_error(&status);
                Err(BackendError::Failed(status))
            }
        }
    }

    /// Asks usage to admit one request (batched with whatever else is waiting).
    pub async fn admit(&self, admission: &Admission<'_>) -> Result<AdmissionOutcome, BackendError> {
        self.admit_proto(admission_to_proto(admission))
            .await
            .map(outcome_from_proto)
    }

    async fn admit_proto(
        &self,
        admission: usage_pb::AdmitRequest,
    ) -> Result<usage_pb::AdmitResponse, BackendError> {
        if !self.usage_breaker.permitted() {
            return Err(BackendError::CircuitOpen);
        }
        let (answer, answered) = oneshot::channel();
        let pending = PendingAdmission {
            request: admission,
            answer,
            trace: telemetry::traces::current(),
        };
        if self.admissions.send(pending).is_err() {
            return Err(BackendError::Failed(tonic::Status::unavailable(
                "the admission batcher has stopped",
            )));
        }
        // A request may wait for a batch slot and then for its batch, each bounded by the batch's deadline.
        // If this gives up first, a request still queued is dropped unsent (nothing is charged for it).
        match tokio::time::timeout(batch_deadline(self.deadline) * 2, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BackendError::Failed(tonic::Status::internal(
                "the admission batcher dropped a request",
            ))),
            Err(_) => Err(BackendError::Failed(tonic::Status::deadline_exceeded(
                "usage did not answer in time",
            ))),
        }
    }

    /// Asks usage for leases, one per ask, in one call. `Ok(answers)` holds one answer per ask, in order:
    /// `Ok(None)` for an empty grant (admit that customer per request), `Err` for an ask usage could not
    /// decide or answered with figures this gateway cannot use (nothing of it is spent; usage writes such
    /// a lease off if it did reserve anything). The whole call failing is `Err(BackendError)`.
    pub async fn lease(
        &self,
        holder: Uuid,
        asks: &[LeaseAsk<'_>],
    ) -> Result<Vec<Result<Option<Grant>, String>>, BackendError> {
        if !self.usage_breaker.permitted() {
            return Err(BackendError::CircuitOpen);
        }
        let mut request = Request::new(usage_pb::LeaseRequest {
            holder_id: holder.to_string(),
            asks: asks.iter().map(lease_ask_to_proto).collect(),
        });
        request.set_timeout(self.deadline);
        let answer = self
            .call_usage(self.usage.clone().lease(request))
            .await?
            .grants;
        if answer.len() != asks.len() {
            return Err(BackendError::Failed(tonic::Status::internal(format!(
                "usage answered {} grants for {} asks",
                answer.len(),
                asks.len()
            ))));
        }
        Ok(asks
            .iter()
            .zip(answer)
            .map(|(ask, grant)| grant_from_proto(ask, grant))
            .collect())
    }

    /// Returns closed leases to usage in one call, with what each spent; one outcome per lease, in order.
    /// Safe to repeat: a return is applied once per lease id.
    pub async fn return_leases(
        &self,
        holder: Uuid,
        leases: &[LeaseToReturn],
    ) -> Result<Vec<ReturnOutcome>, BackendError> {
        let mut request = Request::new(usage_pb::ReturnLeasesRequest {
            holder_id: holder.to_string(),
            returns: leases.iter().map(lease_return_to_proto).collect(),
        });
        request.set_timeout(self.deadline);
        let answer = self
            .call_usage(self.usage.clone().return_leases(request))
            .await?;
        if answer.results.len() != leases.len() {
            return Err(BackendError::Failed(tonic::Status::internal(format!(
                "usage answered {} returns for {} leases",
                answer.results.len(),
                leases.len()
            ))));
        }
        Ok(answer
            .results
            .iter()
            .map(|result| match result.outcome() {
                usage_pb::LeaseOutcome::Returned | usage_pb::LeaseOutcome::AlreadyReturned => {
                    ReturnOutcome::Returned
                }
                usage_pb::LeaseOutcome::WrittenOff => ReturnOutcome::WrittenOff,
                usage_pb::LeaseOutcome::Unknown => ReturnOutcome::Unknown,
                usage_pb::LeaseOutcome::Unspecified => ReturnOutcome::Retry(result.error.clone()),
            })
            .collect())
    }

    /// Opens the stream of recalls of `holder`'s leases. Usage registers the holder before it answers, so
    /// once this returns no recall of its leases is missed while the stream stays up.
    pub async fn watch_recalls(&self, holder: Uuid) -> Result<Recalls, BackendError> {
        let request = Request::new(usage_pb::WatchRecallsRequest {
            holder_id: holder.to_string(),
        });
        let opened =
            tokio::time::timeout(self.deadline, self.usage.clone().watch_recalls(request)).await;
        match opened {
            Ok(Ok(stream)) => Ok(Recalls(stream.into_inner())),
            Ok(Err(status)) => Err(BackendError::Failed(status)),
            Err(_) => Err(BackendError::Failed(tonic::Status::deadline_exceeded(
                "usage did not open the recall stream in time",
            ))),
        }
    }

    /// Runs one unary call to usage under the deadline, telling its breaker how it went.
    async fn call_usage<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.deadline, call).await {
            Ok(Ok(answer)) => {
                self.usage_breaker.on_success();
                Ok(answer.into_inner())
            }
            Ok(Err(status)) => {
                self.usage_breaker.on_error(&status);
                Err(BackendError::Failed(status))
            }
            Err(_) => {
                let status = tonic::Status::deadline_exceeded("usage did not answer in time");
                self.usage_breaker.on_error(&status);
                Err(BackendError::Failed(status))
            }
        }
    }

    /// Gives back what the admission of `request_id` took. One attempt is made at once (bounded by the
    /// deadline); when it fails the refund is retried in the background with backoff (for about three
    /// minutes): a refund is applied once per request id however often it is sent, so retrying is safe,
    /// and the customer must not pay for a request the provider failed to serve.
    pub async fn refund(&self, customer_id: &str, request_id: &str) {
        if try_refund(&self.usage, self.deadline, customer_id, request_id)
            .await
            .is_err()
        {
            refund_in_background(&self.usage, self.deadline, customer_id, request_id);
        }
    }

    /// Gives back what the admission of `request_id` took, entirely in the background; for answers that
    /// must not wait for usage (a client that went away, an outcome not known).
    pub fn refund_later(&self, customer_id: &str, request_id: &str) {
        refund_in_background(&self.usage, self.deadline, customer_id, request_id);
    }

    /// Gives back, in the background, the `units` that request `request_id` spent from lease `lease_id`
    /// after the lease was returned (a late refund; once per request id, retried like any refund).
    pub fn refund_from_returned_lease(
        &self,
        customer_id: &str,
        lease_id: Uuid,
        request_id: &str,
        units: u64,
    ) {
        let refund = usage_pb::RefundRequest {
            request_id: request_id.to_owned(),
            customer_id: customer_id.to_owned(),
            lease_id: lease_id.to_string(),
            units: i64::try_from(units).unwrap_or(i64::MAX),
        };
        send_refund_in_background(&self.usage, self.deadline, refund);
    }
}

/// What usage did with one returned lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnOutcome {
    /// Returned, now or before: the unspent part is free again and the spent part goes to billing.
    Returned,
    /// Its deadline and grace had passed: nothing of it is billed, its units stay used in the period.
    WrittenOff,
    /// Usage knows no such lease of this customer from this holder.
    Unknown,
    /// This return could not be processed (nothing changed): send it again.
    Retry(String),
}

/// The recalls of one holder's leases, as usage sends them.
pub struct Recalls(tonic::Streaming<usage_pb::Recall>);

impl Recalls {
    /// Returns the next customer whose leases are recalled; `None` when usage ended the stream.
    pub async fn next(&mut self) -> Option<Result<String, tonic::Status>> {
        match self.0.message().await {
            Ok(Some(recall)) => Some(Ok(recall.customer_id)),
            Ok(None) => None,
            Err(status) => Some(Err(status)),
        }
    }
}

static REFUND_FAILED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
static REFUND_ABANDONED: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);

fn refund_in_background(
    usage: &UsageApiClient,
    deadline: Duration,
    customer_id: &str,
    request_id: &str,
) {
    let refund = usage_pb::RefundRequest {
        request_id: request_id.to_owned(),
        customer_id: customer_id.to_owned(),
        ..Default::default()
    };
    send_refund_in_background(usage, deadline, refund);
}

fn send_refund_in_background(
    usage: &UsageApiClient,
    deadline: Duration,
    refund: usage_pb::RefundRequest,
) {
    let usage = usage.clone();
    tokio::spawn(async move {
        let (customer_id, request_id) = (refund.customer_id.as_str(), refund.request_id.as_str());
        let attempt = || try_send_refund(&usage, deadline, refund.clone());
        let retried = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(30))
                    .with_max_times(12),
            )
            .await;
        match retried {
            Ok(()) => tracing::debug!(customer_id, request_id, "refund applied after retrying"),
            Err(status) => {
                if let Some(suppressed) = REFUND_ABANDONED.event() {
                    tracing::error!(customer_id, request_id, code = ?status.code(), suppressed, "refund abandoned after retries");
                }
            }
        }
    });
}

async fn try_refund(
    usage: &UsageApiClient,
    deadline: Duration,
    customer_id: &str,
    request_id: &str,
) -> Result<(), tonic::Status> {
    let refund = usage_pb::RefundRequest {
        request_id: request_id.to_owned(),
        customer_id: customer_id.to_owned(),
        ..Default::default()
    };
    try_send_refund(usage, deadline, refund).await
}

async fn try_send_refund(
    usage: &UsageApiClient,
    deadline: Duration,
    refund: usage_pb::RefundRequest,
) -> Result<(), tonic::Status> {
    let (customer_id, request_id) = (refund.customer_id.clone(), refund.request_id.clone());
    let mut request = Request::new(refund);
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, usage.clone().refund(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => {
            if let Some(suppressed) = REFUND_FAILED.event() {
                tracing::warn!(%customer_id, %request_id, code = ?status.code(), suppressed, "refund failed; retrying");
            }
            Err(status)
        }
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "usage did not answer a refund in time",
        )),
    }
}

/// Most usage waits, inside one admission, for another gateway to return recalled leases
/// (`USAGE_RECALL_WAIT_MS` is at most 200).
const MOST_RECALL_WAIT: Duration = Duration::from_millis(200);

/// Returns the deadline of an admission batch: the call's own, plus the longest recall wait usage may spend
/// deciding it, so that a request waiting for units another gateway holds is not cut off as failed.
fn batch_deadline(deadline: Duration) -> Duration {
    deadline + MOST_RECALL_WAIT
}

/// Sends queued admissions to usage in batches until every `Backends` clone is gone.
async fn send_admissions(
    mut queue: mpsc::UnboundedReceiver<PendingAdmission>,
    usage: UsageApiClient,
    breaker: Arc<Breaker>,
    deadline: Duration,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        // A caller that gave up (its deadline, or its client went away) must not be charged.
        batch.retain(|pending| !pending.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (usage, breaker) = (usage.clone(), breaker.clone());
        tokio::spawn(async move {
            admit_batch(&usage, &breaker, deadline, batch).await;
            drop(slot);
        });
    }
}

async fn admit_batch(
    usage: &UsageApiClient,
    breaker: &Breaker,
    deadline: Duration,
    batch: Vec<PendingAdmission>,
) {
    // The batch's span is a child of its first request's trace and linked to every other request's, so
    // each request's trace leads to the usage call that decided it.
    let span = tracing::info_span!("admit_batch", requests = batch.len());
    if let Some(first) = batch.first() {
        telemetry::traces::set_parent(&span, first.trace.clone());
    }
    for other in batch.iter().skip(1) {
        telemetry::traces::add_link(&span, &other.trace);
    }
    let trace = {
        let _entered = span.enter();
        telemetry::traces::current()
    };
    let (requests, answers): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.request, pending.answer))
        .unzip();
    let ids: Vec<(String, String)> = requests
        .iter()
        .map(|request| (request.customer_id.clone(), request.request_id.clone()))
        .collect();
    let mut call = Request::new(usage_pb::AdmitBatchRequest {
        requests: requests.clone(),
    });
    let deadline = batch_deadline(deadline);
    call.set_timeout(deadline);
    telemetry::traces::inject_into_metadata(&trace, call.metadata_mut());
    let outcome = tokio::time::timeout(deadline, usage.clone().admit_batch(call)).await;
    let results: Vec<Result<usage_pb::AdmitResponse, BackendError>> = match outcome {
        Ok(Ok(answer)) => {
            breaker.on_success();
            let decisions = answer.into_inner().decisions;
            if decisions.len() == answers.len() {
                decisions.into_iter().map(item_result).collect()
            } else {
                let status =
                    tonic::Status::internal("usage answered a batch with a different count");
                answers
                    .iter()
                    .map(|_| Err(BackendError::Failed(status.clone())))
                    .collect()
            }
        }
        // A batch is refused whole when one request in it is invalid; asking one by one keeps the
        // others' answers.
        Ok(Err(status)) if status.code() == Code::InvalidArgument => {
            breaker.on_success();
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                results.push(admit_one(usage, deadline, request).await);
            }
            results
        }
        Ok(Err(status)) => {
            breaker.on_error(&status);
            answers
                .iter()
                .map(|_| Err(BackendError::Failed(status.clone())))
                .collect()
        }
        Err(_) => {
            let status = tonic::Status::deadline_exceeded("usage did not answer in time");
            breaker.on_error(&status);
            answers
                .iter()
                .map(|_| Err(BackendError::Failed(status.clone())))
                .collect()
        }
    };
    for ((answer, result), (customer_id, request_id)) in answers.into_iter().zip(results).zip(ids) {
        let charged = matches!(&result, Ok(decision) if decision.decision() == usage_pb::Decision::Admitted && !decision.replayed);
        let unknown =
            matches!(&result, Err(BackendError::Failed(status)) if outcome_unknown(status));
        let delivered = answer.send(result).is_ok();
        // The caller stopped waiting after usage took the units (it answers 503 or nothing), or nobody knows
        // whether usage took them: either way the units go back. A refund of an id usage never admitted
        // changes nothing.
        if (charged && !delivered) || unknown {
            refund_in_background(usage, deadline, &customer_id, &request_id);
        }
    }
}

/// Tells whether a failed admission call may still have been carried out by usage: anything but a refusal
/// usage gives before deciding (authentication, validation, an unknown method).
fn outcome_unknown(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::Unimplemented
    )
}

fn item_result(decision: usage_pb::AdmitResponse) -> Result<usage_pb::AdmitResponse, BackendError> {
    if decision.error.is_empty() {
        Ok(decision)
    } else {
        Err(BackendError::Failed(tonic::Status::unavailable(
            decision.error,
        )))
    }
}

async fn admit_one(
    usage: &UsageApiClient,
    deadline: Duration,
    admission: usage_pb::AdmitRequest,
) -> Result<usage_pb::AdmitResponse, BackendError> {
    let mut request = Request::new(admission);
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, usage.clone().admit(request)).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(BackendError::Failed(status)),
        Err(_) => Err(BackendError::Failed(tonic::Status::deadline_exceeded(
            "usage did not answer in time",
        ))),
    }
}

// Proto types stop here: billing's and usage's messages are converted to and from the gateway's own types
// once, so the decision never reads a wire format.

fn entitlement_from_proto(entitlement: billing_pb::Entitlement) -> Entitlement {
    let standing = match entitlement.standing() {
        billing_pb::Standing::Good => Standing::Good,
        billing_pb::Standing::PastDueInGrace => Standing::PastDueInGrace,
        billing_pb::Standing::PastDue => Standing::PastDue,
        billing_pb::Standing::NoSubscription | billing_pb::Standing::Unspecified => {
            Standing::NoSubscription
        }
        billing_pb::Standing::Inactive => Standing::Inactive,
    };
    Entitlement {
        standing,
        limits: entitlement
            .limits
            .map(limits_from_proto)
            .unwrap_or_default(),
        period_start: entitlement.period_start.and_then(instant_from_proto),
        period_end: entitlement.period_end.and_then(instant_from_proto),
        valid_until: entitlement.valid_until.and_then(instant_from_proto),
        customer_id: entitlement.customer_id,
        subscription_id: entitlement.subscription_id,
        plan_code: entitlement.plan_code,
        features: entitlement.features,
        currency: entitlement.currency,
    }
}

fn limits_from_proto(limits: billing_pb::Limits) -> Limits {
    let overage = match limits.overage_mode() {
        billing_pb::OverageMode::Unspecified => Overage::Unspecified,
        billing_pb::OverageMode::Block => Overage::Block,
        billing_pb::OverageMode::Credits => Overage::Credits,
    };
    Limits {
        included_units: limits.included_units,
        rate_limit: limits.rate_limit,
        rate_period_ms: limits.rate_period_ms,
        burst: limits.burst,
        overage,
        unit_price_micros: limits.unit_price_micros,
    }
}

fn limits_to_proto(limits: &Limits) -> billing_pb::Limits {
    let overage_mode = match limits.overage {
        Overage::Unspecified => billing_pb::OverageMode::Unspecified,
        Overage::Block => billing_pb::OverageMode::Block,
        Overage::Credits => billing_pb::OverageMode::Credits,
    };
    billing_pb::Limits {
        included_units: limits.included_units,
        rate_limit: limits.rate_limit,
        rate_period_ms: limits.rate_period_ms,
        burst: limits.burst,
        overage_mode: overage_mode.into(),
        unit_price_micros: limits.unit_price_micros,
    }
}

fn admission_to_proto(admission: &Admission<'_>) -> usage_pb::AdmitRequest {
    let entitlement = admission.entitlement;
    usage_pb::AdmitRequest {
        request_id: admission.id.to_owned(),
        customer_id: entitlement.customer_id.clone(),
        subscription_id: entitlement.subscription_id.clone(),
        units: admission.units,
        limits: Some(limits_to_proto(&entitlement.limits)),
        period_start: entitlement.period_start.map(instant_to_proto),
        period_end: entitlement.period_end.map(instant_to_proto),
    }
}

fn outcome_from_proto(answer: usage_pb::AdmitResponse) -> AdmissionOutcome {
    let decision = match answer.decision() {
        usage_pb::Decision::Admitted => AdmissionDecision::Admitted,
        usage_pb::Decision::RateLimited => AdmissionDecision::RateLimited {
            retry_after_ms: answer.retry_after_ms,
        },
        usage_pb::Decision::QuotaExhausted => AdmissionDecision::QuotaExhausted,
        // A decision this gateway does not know is a refusal all the same, answered as the credits one.
        usage_pb::Decision::CreditsExhausted | usage_pb::Decision::Unspecified => {
            AdmissionDecision::CreditsExhausted
        }
    };
    AdmissionOutcome {
        decision,
        quota_used: answer.quota_used,
        quota_limit: answer.quota_limit,
        quota_resets_at: answer.quota_resets_at.and_then(instant_from_proto),
        credits_taken_micros: answer.credits_taken_micros,
        credits_remaining_micros: (answer.credits_remaining_micros >= 0)
            .then_some(answer.credits_remaining_micros),
    }
}

/// One lease this gateway asks usage for: a fresh lease id, the customer's entitlement (limits and
/// period) and how much it wants.
#[derive(Debug, Clone, Copy)]
pub struct LeaseAsk<'a> {
    pub lease_id: Uuid,
    pub entitlement: &'a Entitlement,
    pub wanted: Wanted,
}

fn lease_ask_to_proto(ask: &LeaseAsk<'_>) -> usage_pb::LeaseAsk {
    let entitlement = ask.entitlement;
    usage_pb::LeaseAsk {
        lease_id: ask.lease_id.to_string(),
        customer_id: entitlement.customer_id.clone(),
        subscription_id: entitlement.subscription_id.clone(),
        limits: Some(limits_to_proto(&entitlement.limits)),
        period_start: entitlement.period_start.map(instant_to_proto),
        period_end: entitlement.period_end.map(instant_to_proto),
        units_wanted: i64::try_from(ask.wanted.units).unwrap_or(i64::MAX),
        slots_wanted: ask.wanted.slots,
        min_units: i64::try_from(ask.wanted.min_units).unwrap_or(i64::MAX),
    }
}

/// Turns usage's answer to `ask` into a grant; `Ok(None)` when it is empty. Figures that cannot be right
/// (another lease id, negative amounts) are an error: such a grant is never spent.
fn grant_from_proto(
    ask: &LeaseAsk<'_>,
    grant: usage_pb::LeaseGrant,
) -> Result<Option<Grant>, String> {
    if !grant.error.is_empty() {
        return Err(grant.error);
    }
    if grant.lease_id != ask.lease_id.to_string() {
        return Err(format!(
            "usage answered lease `{}` for lease `{}`",
            grant.lease_id, ask.lease_id
        ));
    }
    let (Ok(quota_units), Ok(credit_units), Ok(unit_price_micros)) = (
        u64::try_from(grant.quota_units),
        u64::try_from(grant.credit_units),
        u64::try_from(grant.unit_price_micros),
    ) else {
        return Err(format!("lease `{}` has negative figures", ask.lease_id));
    };
    if quota_units == 0 && credit_units == 0 {
        return Ok(None);
    }
    let slots = (grant.slots > 0).then(|| Slots {
        count: grant.slots,
        first_slot_offset: Duration::from_micros(grant.first_slot_offset_us),
        emission: Duration::from_micros(grant.emission_us),
        tolerance: Duration::from_micros(grant.tolerance_us),
    });
    if ask.entitlement.limits.rate_limit > 0 && slots.is_none() {
        return Err(format!(
            "lease `{}` holds units but no slots under a rate limit",
            ask.lease_id
        ));
    }
    Ok(Some(Grant {
        lease_id: ask.lease_id,
        customer_id: ask.entitlement.customer_id.clone(),
        quota_units,
        credit_units,
        unit_price_micros,
        slots,
        ttl: Duration::from_millis(grant.ttl_ms),
        figures: GrantFigures {
            quota_limit: grant.quota_limit,
            quota_used: grant.quota_used,
            quota_resets_at: grant
                .quota_resets_at
                .and_then(instant_from_proto)
                .map(SystemTime::from),
            credits_remaining_micros: (grant.credits_remaining_micros >= 0)
                .then_some(grant.credits_remaining_micros),
        },
    }))
}

fn lease_return_to_proto(lease: &LeaseToReturn) -> usage_pb::LeaseReturn {
    usage_pb::LeaseReturn {
        lease_id: lease.lease.id().to_string(),
        customer_id: lease.lease.customer_id().to_owned(),
        units_spent: i64::try_from(lease.closing.units_spent).unwrap_or(i64::MAX),
        first_unused_slot: lease.closing.first_unused_slot,
    }
}

fn instant_from_proto(timestamp: prost_types::Timestamp) -> Option<OffsetDateTime> {
    let nanos = i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

fn instant_to_proto(instant: OffsetDateTime) -> prost_types::Timestamp {
    let nanos = instant.unix_timestamp_nanos();
    prost_types::Timestamp {
        seconds: i64::try_from(nanos.div_euclid(1_000_000_000)).unwrap_or(i64::MAX),
        nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admission_carries_the_entitlements_period_and_limits_to_usage_unchanged() {
        let limits = billing_pb::Limits {
            included_units: 100,
            rate_limit: 5,
            rate_period_ms: 1_000,
            burst: 2,
            overage_mode: billing_pb::OverageMode::Credits.into(),
            unit_price_micros: 250,
        };
        let start = prost_types::Timestamp {
            seconds: 1_764_547_200,
            nanos: 123_456_789,
        };
        let end = prost_types::Timestamp {
            seconds: 1_767_225_600,
            nanos: 0,
        };
        let entitlement = entitlement_from_proto(billing_pb::Entitlement {
            customer_id: "cus".to_owned(),
            subscription_id: "sub".to_owned(),
            limits: Some(limits),
            period_start: Some(start),
            period_end: Some(end),
            ..billing_pb::Entitlement::default()
        });

        let request = admission_to_proto(&Admission {
            id: "adm",
            entitlement: &entitlement,
            units: 3,
        });

        assert_eq!(request.limits, Some(limits));
        assert_eq!(request.period_start, Some(start));
        assert_eq!(request.period_end, Some(end));
        assert_eq!(
            (
                request.request_id.as_str(),
                request.customer_id.as_str(),
                request.subscription_id.as_str(),
                request.units
            ),
            ("adm", "cus", "sub", 3)
        );
    }

    #[test]
    fn an_unspecified_standing_means_no_subscription_and_missing_limits_are_zero() {
        let entitlement = entitlement_from_proto(billing_pb::Entitlement::default());

        assert_eq!(entitlement.standing, Standing::NoSubscription);
        assert_eq!(entitlement.limits, Limits::default());
        assert_eq!(
            admission_to_proto(&Admission {
                id: "adm",
                entitlement: &entitlement,
                units: 1,
            })
            .limits,
            Some(billing_pb::Limits::default())
        );
    }

    #[test]
    fn credits_usage_has_not_loaded_are_none_and_an_unknown_decision_refuses() {
        let outcome = outcome_from_proto(usage_pb::AdmitResponse {
            credits_remaining_micros: -1,
            ..usage_pb::AdmitResponse::default()
        });

        assert_eq!(outcome.credits_remaining_micros, None);
        assert_eq!(outcome.decision, AdmissionDecision::CreditsExhausted);
    }

    fn rate_limited_entitlement() -> Entitlement {
        entitlement_from_proto(billing_pb::Entitlement {
            customer_id: "cus".to_owned(),
            subscription_id: "sub".to_owned(),
            limits: Some(billing_pb::Limits {
                included_units: 1_000,
                rate_limit: 100,
                rate_period_ms: 1_000,
                burst: 50,
                overage_mode: billing_pb::OverageMode::Credits.into(),
                unit_price_micros: 250,
            }),
            ..billing_pb::Entitlement::default()
        })
    }

    fn lease_ask(entitlement: &Entitlement) -> LeaseAsk<'_> {
        LeaseAsk {
            lease_id: Uuid::from_u128(7),
            entitlement,
            wanted: Wanted {
                units: 40,
                slots: 10,
                min_units: 2,
            },
        }
    }

    fn usage_grant() -> usage_pb::LeaseGrant {
        usage_pb::LeaseGrant {
            lease_id: Uuid::from_u128(7).to_string(),
            quota_units: 30,
            credit_units: 4,
            unit_price_micros: 250,
            slots: 10,
            first_slot_offset_us: 2_000,
            emission_us: 10_000,
            tolerance_us: 500_000,
            ttl_ms: 2_000,
            quota_used: 530,
            quota_limit: 1_000,
            credits_remaining_micros: -1,
            ..usage_pb::LeaseGrant::default()
        }
    }

    #[test]
    fn a_lease_ask_carries_the_entitlement_and_what_is_wanted() {
        let entitlement = rate_limited_entitlement();

        let ask = lease_ask_to_proto(&lease_ask(&entitlement));

        assert_eq!(ask.lease_id, Uuid::from_u128(7).to_string());
        assert_eq!(
            (ask.customer_id.as_str(), ask.subscription_id.as_str()),
            ("cus", "sub")
        );
        assert_eq!(
            (ask.units_wanted, ask.slots_wanted, ask.min_units),
            (40, 10, 2)
        );
        assert_eq!(ask.limits.map(|limits| limits.rate_limit), Some(100));
    }

    #[test]
    fn a_grant_becomes_a_lease_with_its_units_slots_ttl_and_figures() {
        let entitlement = rate_limited_entitlement();

        let grant = grant_from_proto(&lease_ask(&entitlement), usage_grant())
            .expect("usable")
            .expect("not empty");

        assert_eq!(
            (
                grant.quota_units,
                grant.credit_units,
                grant.unit_price_micros
            ),
            (30, 4, 250)
        );
        assert_eq!(
            grant.slots,
            Some(Slots {
                count: 10,
                first_slot_offset: Duration::from_millis(2),
                emission: Duration::from_millis(10),
                tolerance: Duration::from_millis(500),
            })
        );
        assert_eq!(grant.ttl, Duration::from_secs(2));
        assert_eq!(
            (grant.figures.quota_used, grant.figures.quota_limit),
            (530, 1_000)
        );
        assert_eq!(grant.figures.credits_remaining_micros, None);
        assert_eq!(grant.customer_id, "cus");
    }

    #[test]
    fn an_empty_grant_means_per_request_admission() {
        let entitlement = rate_limited_entitlement();
        let empty = usage_pb::LeaseGrant {
            lease_id: Uuid::from_u128(7).to_string(),
            ..usage_pb::LeaseGrant::default()
        };

        assert_eq!(grant_from_proto(&lease_ask(&entitlement), empty), Ok(None));
    }

    #[test]
    fn a_grant_that_cannot_be_right_is_never_spent() {
        let entitlement = rate_limited_entitlement();
        let ask = lease_ask(&entitlement);
        let other_lease = usage_pb::LeaseGrant {
            lease_id: Uuid::from_u128(8).to_string(),
            ..usage_grant()
        };
        let negative = usage_pb::LeaseGrant {
            credit_units: -1,
            ..usage_grant()
        };
        let no_slots = usage_pb::LeaseGrant {
            slots: 0,
            ..usage_grant()
        };
        let failed = usage_pb::LeaseGrant {
            error: "redis said no".to_owned(),
            ..usage_grant()
        };

        for grant in [other_lease, negative, no_slots, failed] {
            assert!(grant_from_proto(&ask, grant).is_err());
        }
    }

    #[test]
    fn a_returned_lease_says_what_it_spent_and_its_first_unused_slot() {
        let entitlement = rate_limited_entitlement();
        let grant = grant_from_proto(&lease_ask(&entitlement), usage_grant())
            .expect("usable")
            .expect("not empty");
        let now = Instant::now();
        let lease = Arc::new(crate::leases::Lease::new(grant, now, now));
        let closing = lease.close();

        let returned = lease_return_to_proto(&LeaseToReturn { lease, closing });

        assert_eq!(returned.lease_id, Uuid::from_u128(7).to_string());
        assert_eq!(returned.customer_id, "cus");
        assert_eq!(returned.units_spent, 0);
        assert_eq!(returned.first_unused_slot, closing.first_unused_slot);
    }
}
