//! Traces: the OTLP exporter (only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and W3C trace context
//! carried across the services: injected into gRPC metadata and upstream HTTP headers, extracted from
//! incoming HTTP requests and gRPC calls. Both directions live here so the format cannot drift.

use std::{
    future::Future,
    task::{Context as TaskContext, Poll},
};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::{Instrument, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Builds the OTLP trace pipeline for `service` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter
/// reads the endpoint and the other standard `OTEL_EXPORTER_OTLP_*` variables itself); `None` otherwise.
pub(crate) fn otlp_provider(service: &'static str) -> anyhow::Result<Option<SdkTracerProvider>> {
    match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {}
        _ => return Ok(None),
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|error| anyhow::anyhow!("failed to set up OTLP trace export: {error}"))?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build(),
    ))
}

/// Returns the `tracing` layer that turns spans into OpenTelemetry spans of `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
    service: &'static str,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(service))
}

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// Returns the trace context of the current `tracing` span.
pub fn current() -> Context {
    tracing::Span::current().context()
}

/// Writes `context` into gRPC metadata as a W3C `traceparent`.
pub fn inject_into_metadata(context: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    propagator().inject_context(context, &mut MetadataInjector(metadata));
}

/// Writes `context` into HTTP headers as a W3C `traceparent`, replacing any the caller sent. Without a
/// trace (tracing off) the headers are left as they are, so a caller's trace still reaches the upstream.
pub fn inject_into_headers(context: &Context, headers: &mut http::HeaderMap) {
    use opentelemetry::trace::TraceContextExt;

    if !context.span().span_context().is_valid() {
        return;
    }
    headers.remove("traceparent");
    headers.remove("tracestate");
    propagator().inject_context(context, &mut HeaderInjector(headers));
}

/// Reads a W3C `traceparent` from HTTP headers (or gRPC metadata, which travels as headers); an absent or
/// malformed one gives an empty context, so the span starts a new trace.
pub fn extract_from_headers(headers: &http::HeaderMap) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// Links `span` to the span of `other` (a request it also serves, in another trace).
pub fn add_link(span: &tracing::Span, other: &Context) {
    use opentelemetry::trace::TraceContextExt;

    let linked = other.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Makes `span` a child of the trace context `parent` (a caller's `traceparent`).
pub fn set_parent(span: &tracing::Span, parent: Context) {
    let _ = span.set_parent(parent);
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A tower layer for a gRPC server: each call runs in a span `grpc` (fields `service` and `method`) whose
/// parent is the caller's `traceparent`, so the handler's spans join the caller's trace.
#[derive(Clone, Copy)]
pub struct GrpcTraceLayer {
    service: &'static str,
}

impl GrpcTraceLayer {
    /// Returns the layer for `service` (recorded on every call's span).
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraced {
            inner,
            service: self.service,
        }
    }
}

/// A gRPC service whose calls join their caller's trace.
#[derive(Clone)]
pub struct GrpcTraced<S> {
    inner: S,
    service: &'static str,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcTraced<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Future,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, context: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let span = tracing::info_span!("grpc", service = self.service, method = %method);
        set_parent(&span, extract_from_headers(request.headers()));
        self.inner.call(request).instrument(span)
    }
}
