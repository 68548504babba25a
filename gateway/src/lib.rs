//! The gateway: paygate's HTTP front door, which decides per request whether to forward or answer 402
//! (DESIGN §2). It talks to billing (`Entitlements`) and usage (`Usage`) over gRPC.
//!
//! Layout (the server, cache and proxy land with the gateway issue; these are the rules they apply):
//! - `routes`: the routes file and longest-prefix lookup
//! - `headers`: API-key extraction and header hygiene toward upstreams and clients
//! - `problem`: problem+json bodies and the human pages per code

pub mod headers;
pub mod problem;
pub mod routes;
