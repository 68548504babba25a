//! Counts every RPC billing answers as `paygate_billing_rpcs_total{method, status}`: a tower layer around
//! the whole gRPC server, so no handler can forget to count.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

/// The layer to give `tonic::transport::Server::layer`.
#[derive(Clone, Copy, Default)]
pub struct CountRpcs;

impl<S> tower::Layer<S> for CountRpcs {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted(inner)
    }
}

/// A service whose calls are counted.
#[derive(Clone)]
pub struct Counted<S>(S);

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let answer = self.0.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // A failed call is answered trailers-only, with its status in the headers; a successful
            // unary call carries its OK in trailers, so no status header means OK.
            let code = response
                .headers()
                .get("grpc-status")
                .map(|value| tonic::Code::from_bytes(value.as_bytes()))
                .unwrap_or(tonic::Code::Ok);
            // Method names come from the caller: an unknown one is not used as a label value.
            let method = if code == tonic::Code::Unimplemented {
                "unknown".to_owned()
            } else {
                method
            };
            metrics::counter!(
                "paygate_billing_rpcs_total",
                "method" => method,
                "status" => format!("{code:?}"),
            )
            .increment(1);
            Ok(response)
        })
    }
}
