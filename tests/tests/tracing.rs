//! Trace context through the real stack: one request is one trace in the gateway, usage and billing, and
//! the upstream is told about it. Spans go to an in-memory exporter installed as this test process's
//! subscriber (the services run in-process and record into it).

use std::sync::Arc;

use integration_tests::{
    free_plan, fresh_database, get, http_client, keyed_customer, send, spawn_billing_with_clock,
    spawn_gateway, spawn_ok_upstream, spawn_usage,
};
use opentelemetry::{Value, trace::TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use time::OffsetDateTime;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn one_request_is_one_trace_across_gateway_usage_billing_and_the_upstream() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(telemetry::traces::layer(&provider, "test"))
        .init();
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    let billing = spawn_billing_with_clock(fresh_database().await, clock).await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let routes = format!(
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let customer = keyed_customer(&billing, Some(free_plan(1_000))).await;
    let secret = customer.secret.clone();

    let answer = send(
        &http_client(),
        get(
            &gateway.url("/v1/traced"),
            &[
                ("authorization", &format!("Bearer {secret}")),
                ("traceparent", &format!("00-{TRACE_ID}-00f067aa0ba902b7-01")),
            ],
        ),
    )
    .await;
    provider.force_flush().expect("flushed");
    let spans = exporter.get_finished_spans().expect("spans");

    assert_eq!(answer.status, http::StatusCode::OK);
    let trace_id = TraceId::from_hex(TRACE_ID).expect("a trace id");
    let in_trace: Vec<_> = spans
        .iter()
        .filter(|span| span.span_context.trace_id() == trace_id)
        .collect();
    let attribute = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|pair| pair.key.as_str() == key)
            .map(|pair| pair.value.clone())
    };
    let request = in_trace
        .iter()
        .find(|span| span.name == "request")
        .expect("the gateway's request span is in the caller's trace");
    assert_eq!(
        attribute(request, "customer_id"),
        Some(Value::from(customer.id.clone()))
    );
    assert_eq!(attribute(request, "code"), Some(Value::from("forwarded")));
    assert_eq!(attribute(request, "units"), Some(Value::I64(1)));
    assert!(
        in_trace.iter().any(|span| span.name == "admit_batch"),
        "the gateway's call to usage is in the trace"
    );
    for service in ["usage", "billing"] {
        assert!(
            in_trace.iter().any(|span| span.name == "grpc"
                && attribute(span, "service") == Some(Value::from(service))),
            "no {service} span in the trace; spans: {:?}",
            spans
                .iter()
                .map(|span| (span.name.clone(), span.span_context.trace_id()))
                .collect::<Vec<_>>()
        );
    }
    for span in &spans {
        for pair in &span.attributes {
            assert!(
                !pair.value.as_str().contains(&secret),
                "span `{}` carries the key",
                span.name
            );
        }
    }
    let seen = upstream.seen();
    let traceparent = seen[0]["traceparent"].to_str().expect("ascii");
    assert!(
        traceparent.starts_with(&format!("00-{TRACE_ID}-")),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the upstream gets the gateway's span as parent"
    );
}
