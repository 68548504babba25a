//! Bearer tokens on gRPC calls, both sides of the contract: every paygate API requires
//! `authorization: Bearer <token>` (the admin token for `BillingAdmin`, the service token for the internal
//! APIs). Shared so the header format and the constant-time check cannot drift between services.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor};

/// Admits calls whose `authorization` metadata is `Bearer <token>` for one expected token.
#[derive(Clone)]
pub struct BearerAuth {
    // Comparing digests keeps the comparison constant-time regardless of the presented token's length.
    expected: [u8; 32],
}

impl BearerAuth {
    /// Returns an interceptor that requires `token`.
    pub fn new(token: &str) -> Self {
        Self {
            expected: Sha256::digest(token.as_bytes()).into(),
        }
    }

    fn admits(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.expected).into()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.admits(token) => Ok(request),
            _ => Err(Status::unauthenticated("missing or invalid bearer token")),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every outgoing call.
#[derive(Clone)]
pub struct BearerToken {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl BearerToken {
    /// Returns an interceptor that sends `token`; `None` when the token is not valid in a header.
    pub fn new(token: &str) -> Option<Self> {
        let mut header: MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}").parse().ok()?;
        header.set_sensitive(true);
        Some(Self { header })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii header"));
        }
        auth.call(request).map(|_| ())
    }

    #[test]
    fn a_client_token_is_admitted_by_the_matching_check() {
        let mut client = BearerToken::new("s3cret-token-value").expect("valid token");
        let mut server = BearerAuth::new("s3cret-token-value");

        let request = client
            .call(Request::new(()))
            .expect("client interceptor never fails");

        assert!(server.call(request).is_ok());
    }

    #[test]
    fn only_the_expected_bearer_token_is_admitted() {
        let mut auth = BearerAuth::new("s3cret-token-value");

        assert!(call_with(&mut auth, Some("Bearer s3cret-token-value")).is_ok());
        assert!(call_with(&mut auth, Some("Bearer s3cret-token-valuE")).is_err());
        assert!(call_with(&mut auth, Some("s3cret-token-value")).is_err());
        assert!(call_with(&mut auth, None).is_err());
    }
}
