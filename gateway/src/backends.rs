//! The gateway's calls to billing and usage: each with a deadline and behind a circuit breaker, so an
//! outage costs one fast failure per request instead of a timeout per request.
//!
//! The breaker is `failsafe`'s state machine, used directly around our own deadline-bounded calls (no
//! tower layering over tonic channels needed): after 3 consecutive failures it opens for an exponentially
//! growing pause (1 s to 10 s; failsafe counts whole seconds), then lets a trial call through.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use failsafe::{
    StateMachine,
    backoff::{self, Exponential},
    failure_policy::{self, ConsecutiveFailures},
};
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

/// billing and usage, as the decision path calls them.
#[derive(Clone)]
pub struct Backends {
    billing: BillingClient,
    usage: UsageApiClient,
    billing_breaker: std::sync::Arc<Breaker>,
    usage_breaker: std::sync::Arc<Breaker>,
    deadline: Duration,
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
    /// Returns backends over the two channels, sending `token`, giving each call `deadline`.
    pub fn new(billing: Channel, usage: Channel, token: BearerToken, deadline: Duration) -> Self {
        Self {
            billing: EntitlementsClient::with_interceptor(billing, token.clone()),
            usage: UsageClient::with_interceptor(usage, token),
            billing_breaker: std::sync::Arc::new(breaker()),
            usage_breaker: std::sync::Arc::new(breaker()),
            deadline,
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
        if !self.billing_breaker.is_call_permitted() {
            return Err(BackendError::CircuitOpen);
        }
        let mut request = Request::new(billing_pb::ResolveRequest {
            key_digest: digest.to_vec(),
        });
        request.set_timeout(self.deadline);
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

    /// Asks usage to admit one request.
    pub async fn admit(
        &self,
        admission: usage_pb::AdmitRequest,
    ) -> Result<usage_pb::AdmitResponse, BackendError> {
        if !self.usage_breaker.is_call_permitted() {
            return Err(BackendError::CircuitOpen);
        }
        let mut request = Request::new(admission);
        request.set_timeout(self.deadline);
        match tokio::time::timeout(self.deadline, self.usage.clone().admit(request)).await {
            Ok(Ok(answer)) => {
                self.usage_breaker.on_success();
                Ok(answer.into_inner())
            }
            Ok(Err(status)) => {
                self.usage_breaker.on_error();
                Err(BackendError::Failed(status))
            }
            Err(_) => {
                self.usage_breaker.on_error();
                Err(BackendError::Failed(tonic::Status::deadline_exceeded(
                    "usage did not answer in time",
                )))
            }
        }
    }

    /// Gives back what the admission of `request_id` took. When usage cannot be reached, the refund is
    /// retried in the background with backoff (for about three minutes): a refund is applied once per
    /// request id however often it is sent, so retrying is safe, and the customer must not pay for a
    /// request the provider failed to serve.
    pub async fn refund(&self, customer_id: &str, request_id: &str) {
        if self.try_refund(customer_id, request_id).await.is_ok() {
            return;
        }
        let backends = self.clone();
        let (customer_id, request_id) = (customer_id.to_owned(), request_id.to_owned());
        tokio::spawn(async move {
            let attempt = || backends.try_refund(&customer_id, &request_id);
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

    async fn try_refund(&self, customer_id: &str, request_id: &str) -> Result<(), tonic::Status> {
        let mut request = Request::new(usage_pb::RefundRequest {
            request_id: request_id.to_owned(),
            customer_id: customer_id.to_owned(),
        });
        request.set_timeout(self.deadline * 4);
        match self.usage.clone().refund(request).await {
            Ok(_) => Ok(()),
            Err(status) => {
                tracing::warn!(customer_id, request_id, code = ?status.code(), "refund failed");
                Err(status)
            }
        }
    }
}
