//! gRPC contracts between the gateway and the backend services, with the pieces of the contract that are
//! code: the API-key format, the bearer-token check and TLS on the gRPC links.

#[allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod billing {
    pub mod v1 {
        tonic::include_proto!("billing.v1");
    }
}

#[allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod usage {
    pub mod v1 {
        tonic::include_proto!("usage.v1");
    }
}

pub mod api_key;
pub mod auth;
pub mod tls;

/// Encoded descriptors of all packages, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptors");
