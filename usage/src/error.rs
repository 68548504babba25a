//! The usage service's errors and how they reach gRPC clients.

use tonic::Status;

/// Redis failures, which repeat on every call while Redis is unreachable.
static REDIS_FAILURES: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);
/// Billing failures, which repeat on every call while billing is unreachable.
static BILLING_FAILURES: telemetry::LogLimit = telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);

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
                if let Some(suppressed) = REDIS_FAILURES.event() {
                    tracing::error!(error = %cause, suppressed, "redis command failed");
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
                if let Some(suppressed) = BILLING_FAILURES.event() {
                    tracing::error!(code = ?status.code(), message = status.message(), suppressed, "billing call failed");
                }
                Self::unavailable("billing unavailable")
            }
        }
    }
}
