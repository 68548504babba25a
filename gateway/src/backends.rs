//! The gateway's calls to billing and usage: each with a deadline and behind a circuit breaker, so an
//! outage costs one fast failure per request instead of a timeout per request.
//!
//! The breaker is `failsafe`'s state machine, used directly around our own deadline-bounded calls (no
//! tower layering over tonic channels needed): after 3 consecutive failures it opens for an exponentially
//! growing pause (1 s to 10 s; failsafe counts whole seconds), then lets a trial call through.
//!
//! Admissions are batched without waiting: a request goes to usage at once while fewer than
//! `BATCHES_IN_FLIGHT` batches are out; otherwise it waits for one to come back and goes with everything
//! else that queued meanwhile, in one `AdmitBatch`. Under load that turns many small gRPC calls and Redis
//! round trips into few large ones; when idle every request travels alone, so batching adds no delay.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use failsafe::{
    StateMachine,
    backoff::{self, Exponential},
    failure_policy::{self, ConsecutiveFailures},
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Request, service::interceptor::InterceptedService, transport::Channel};

use proto::{
    auth::BearerToken,
    billing::v1::{self as billing_pb, entitlements_client::EntitlementsClient},
    usage::v1::{self as usage_pb, usage_client::UsageClient},
};

/// A client of billing's internal API, carrying the service token.
pub type BillingClient = EntitlementsClient<InterceptedService<Channel, BearerToken>>;
/// A client of usage's API, carrying the service token.
pub type UsageApiClient = UsageClient<InterceptedService<Channel, BearerToken>>;

type Breaker = StateMachine<ConsecutiveFailures<Exponential>, ()>;

fn breaker() -> Breaker {
    let policy = failure_policy::consecutive_failures(
        3,
        backoff::exponential(Duration::from_secs(1), Duration::from_secs(10)),
    );
    failsafe::Config::new().failure_policy(policy).build()
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

/// Returns a lazily connecting channel to `url`.
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    use anyhow::Context;

    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("`{url}` is not a valid URL"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl Backends {
    /// Returns backends over the two channels, sending `token`, giving each call `deadline`. Starts the
    /// admission batcher on the current Tokio runtime; it stops when the last clone is dropped.
    pub fn new(billing: Channel, usage: Channel, token: BearerToken, deadline: Duration) -> Self {
        let usage = UsageClient::with_interceptor(usage, token.clone());
        let usage_breaker = Arc::new(breaker());
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
            billing_breaker: Arc::new(breaker()),
            usage_breaker,
            deadline,
            admissions,
        }
    }

    /// Returns the billing client (for the change stream, which has no deadline).
    pub fn billing(&self) -> BillingClient {
        self.billing.clone()
    }

    /// Resolves a key digest: `Ok(None)` when billing does not know it (or it is revoked or expired).
    pub async fn resolve(
        &self,
        digest: [u8; 32],
    ) -> Result<Option<billing_pb::Entitlement>, BackendError> {
        if !permitted(&self.billing_breaker, "billing") {
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
                Ok(Some(answer.into_inner()))
            }
            Ok(Err(status)) if status.code() == Code::NotFound => {
                self.billing_breaker.on_success();
                Ok(None)
            }
            Ok(Err(status)) => {
                self.billing_breaker.on_error();
                Err(BackendError::Failed(status))
            }
            Err(_) => {
                self.billing_breaker.on_error();
                Err(BackendError::Failed(tonic::Status::deadline_exceeded(
                    "billing did not answer in time",
                )))
            }
        }
    }

    /// Asks usage to admit one request (batched with whatever else is waiting).
    pub async fn admit(
        &self,
        admission: usage_pb::AdmitRequest,
    ) -> Result<usage_pb::AdmitResponse, BackendError> {
        if !permitted(&self.usage_breaker, "usage") {
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
        // A request may wait for a batch slot and then for its batch, each bounded by the deadline. If this
        // gives up first, a request still queued is dropped unsent (nothing is charged for it).
        match tokio::time::timeout(self.deadline * 2, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BackendError::Failed(tonic::Status::internal(
                "the admission batcher dropped a request",
            ))),
            Err(_) => Err(BackendError::Failed(tonic::Status::deadline_exceeded(
                "usage did not answer in time",
            ))),
        }
    }

    /// Gives back what the admission of `request_id` took. When usage cannot be reached, the refund is
    /// retried in the background with backoff (for about three minutes): a refund is applied once per
    /// request id however often it is sent, so retrying is safe, and the customer must not pay for a
    /// request the provider failed to serve.
    pub async fn refund(&self, customer_id: &str, request_id: &str) {
        refund(&self.usage, self.deadline, customer_id, request_id).await;
    }
}

async fn refund(usage: &UsageApiClient, deadline: Duration, customer_id: &str, request_id: &str) {
    if try_refund(usage, deadline, customer_id, request_id)
        .await
        .is_ok()
    {
        return;
    }
    let usage = usage.clone();
    let (customer_id, request_id) = (customer_id.to_owned(), request_id.to_owned());
    tokio::spawn(async move {
        let attempt = || try_refund(&usage, deadline, &customer_id, &request_id);
        let retried = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(30))
                    .with_max_times(12),
            )
            .await;
        match retried {
            Ok(()) => tracing::info!(customer_id, request_id, "refund applied after retrying"),
            Err(status) => {
                tracing::error!(customer_id, request_id, code = ?status.code(), "refund abandoned after retries")
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
    let mut request = Request::new(usage_pb::RefundRequest {
        request_id: request_id.to_owned(),
        customer_id: customer_id.to_owned(),
    });
    request.set_timeout(deadline * 4);
    match usage.clone().refund(request).await {
        Ok(_) => Ok(()),
        Err(status) => {
            tracing::warn!(customer_id, request_id, code = ?status.code(), "refund failed");
            Err(status)
        }
    }
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
            breaker.on_error();
            answers
                .iter()
                .map(|_| Err(BackendError::Failed(status.clone())))
                .collect()
        }
        Err(_) => {
            breaker.on_error();
            let status = tonic::Status::deadline_exceeded("usage did not answer in time");
            answers
                .iter()
                .map(|_| Err(BackendError::Failed(status.clone())))
                .collect()
        }
    };
    for ((answer, result), (customer_id, request_id)) in answers.into_iter().zip(results).zip(ids) {
        let charged = matches!(&result, Ok(decision) if decision.decision() == usage_pb::Decision::Admitted && !decision.replayed);
        if answer.send(result).is_err() && charged {
            // The caller stopped waiting after usage took the units: it answers 503 or nothing, so the
            // units go back.
            refund(usage, deadline, &customer_id, &request_id).await;
        }
    }
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

/// Asks `breaker` whether a call may go out, and shows the answer as `paygate_gateway_breaker_open`.
fn permitted(breaker: &Breaker, backend: &'static str) -> bool {
    let permitted = breaker.is_call_permitted();
    metrics::gauge!("paygate_gateway_breaker_open", "backend" => backend).set(if permitted {
        0.0
    } else {
        1.0
    });
    permitted
}
