//! The gateway: paygate's HTTP front door, which decides per request whether to forward or answer 402.
//!
//! It talks to billing (`proto::billing::v1::Entitlements`) and usage (`proto::usage::v1::Usage`); the
//! implementation lands with the gateway issue.

/// The header that names the paying customer on forwarded requests (always set by the gateway, never
/// trusted from the client).
pub const CUSTOMER_HEADER: &str = "paygate-customer";
