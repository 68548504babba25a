//! The billing service's errors and how they reach gRPC clients.

use tonic::Status;

/// Failures to reach the database, which repeat on every call while it is down.
static DATABASE_UNAVAILABLE: telemetry::LogLimit =
    telemetry::LogLimit::new(telemetry::REPEAT_INTERVAL);

/// What can go wrong in billing: outcomes a caller can act on, plus one variant per infrastructure source.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("database query failed")]
    Database(#[from] sqlx::Error),
}

impl From<BillingError> for Status {
    fn from(error: BillingError) -> Self {
        match &error {
            BillingError::InvalidArgument(_) => Self::invalid_argument(error.to_string()),
            BillingError::NotFound(_) => Self::not_found(error.to_string()),
            BillingError::AlreadyExists(_) => Self::already_exists(error.to_string()),
            BillingError::FailedPrecondition(_) => Self::failed_precondition(error.to_string()),
            BillingError::Database(cause) => database_status(cause),
        }
    }
}

fn database_status(cause: &sqlx::Error) -> Status {
    match cause {
        cause if is_unavailable(cause) => {
            if let Some(suppressed) = DATABASE_UNAVAILABLE.event() {
                tracing::error!(error = %cause, suppressed, "database unavailable");
            }
            Status::unavailable("billing database unavailable")
        }
        _ => {
            tracing::error!(error = %cause, "database query failed");
            Status::internal("internal error") // causes stay in our logs, never reach clients
        }
    }
}

/// Tells whether a database error means the database cannot be reached now (a retry may succeed): no
/// connection, or the server refusing work while it shuts down, starts up or recovers.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exception; 57P..: the server shutting down, crashed or starting up
        // (admin_shutdown, crash_shutdown, cannot_connect_now); 53300: too_many_connections.
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

/// Tells whether a database error is a violation of the named unique constraint or index.
pub fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    match error {
        sqlx::Error::Database(database) => {
            database.is_unique_violation() && database.constraint() == Some(constraint)
        }
        _ => false,
    }
}
