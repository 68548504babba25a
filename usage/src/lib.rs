//! The usage service: hot counters (rate windows, period quotas, spendable credits) in Redis.
//!
//! Its contract is `proto::usage::v1::Usage`; the implementation lands with the usage-service issue.

/// Name of the gRPC service this crate implements, for health reporting.
pub const SERVICE_NAME: &str = "usage.v1.Usage";
