//! The usage service's errors and how they reach gRPC clients.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use tonic::Status;

/// Redis failures, which repeat on every call while Redis is unreachable.
static REDIS_FAILURES: RepeatedFailure = RepeatedFailure::new();
/// Billing failures, which repeat on every call while billing is unreachable.
static BILLING_FAILURES: RepeatedFailure = RepeatedFailure::new();

/// What can go wrong in usage: a request a caller must fix, or an infrastructure source.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    #[error("billing call failed")]
    Billing(#[source] Status),
}

impl From<UsageError> for Status {
    fn from(error: UsageError) -> Self {
        match &error {
            UsageError::InvalidArgument(message) => Self::invalid_argument(message.clone()),
            UsageError::Redis(cause) => {
                if let Some(failures) = REDIS_FAILURES.count() {
                    tracing::error!(error = %cause, failures, "redis command failed");
                }
                // An outage is retryable; anything else (a script refusing a wrong-typed key) is not.
                if cause.is_io_error()
                    || cause.is_timeout()
                    || cause.is_connection_dropped()
                    || cause.is_connection_refusal()
                {
                    Self::unavailable("counters unavailable")
                } else {
                    Self::internal("internal error")
                }
            }
            UsageError::Billing(status) => {
                if let Some(failures) = BILLING_FAILURES.count() {
                    tracing::error!(code = ?status.code(), message = status.message(), failures, "billing call failed");
                }
                Self::unavailable("billing unavailable")
            }
        }
    }
}

/// A failure that may repeat on every call during an outage: logged at once the first time, then once per
/// `REPEAT_LOG_INTERVAL` with how many times it happened meanwhile (DESIGN §7).
struct RepeatedFailure {
    state: Mutex<Option<(Instant, u64)>>,
}

/// How often a repeating failure is logged.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl RepeatedFailure {
    const fn new() -> Self {
        Self {
            state: Mutex::new(None),
        }
    }

    /// Returns how many failures the line about this one stands for, or `None` when it is counted
    /// for a later line instead.
    fn count(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *state {
            Some((logged, unlogged)) if logged.elapsed() < REPEAT_LOG_INTERVAL => {
                *unlogged += 1;
                None
            }
            Some((logged, unlogged)) => {
                let failures = *unlogged + 1;
                *logged = Instant::now();
                *unlogged = 0;
                Some(failures)
            }
            None => {
                *state = Some((Instant::now(), 0));
                Some(1)
            }
        }
    }
}
