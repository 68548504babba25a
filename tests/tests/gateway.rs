//! The gateway through the real stack: billing (real PostgreSQL), usage (real Redis), an HTTP upstream.

use std::sync::Arc;

use http::{Response, StatusCode};
use integration_tests::{
    Answer, BillingInstance, body, customer_request, fresh_database, get, http_client,
    plan_request, send, spawn_billing_with_clock, spawn_gateway, spawn_ok_upstream, spawn_upstream,
    spawn_usage,
};
use proto::billing::v1::{
    self as billing_pb, CancelSubscriptionRequest, CreateSubscriptionRequest, IssueApiKeyRequest,
    RevokeApiKeyRequest,
};
use time::OffsetDateTime;
use uuid::Uuid;

fn routes(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
        problem_base_url = "https://docs.example.com/problems"
        top_up_url = "https://billing.example.com/top-up"
        upgrade_url = "https://billing.example.com/plans"

        [[routes]]
        prefix = "/v1"
        upstream = "http://{upstream}"

        [[routes]]
        prefix = "/v1/premium"
        upstream = "http://{upstream}"
        feature = "premium"
        "#
    )
}

/// Billing with its clock at the real now, so entitlements' lifetimes are in the future.
async fn billing_now() -> BillingInstance {
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    spawn_billing_with_clock(fresh_database().await, clock).await
}

struct Customer {
    id: String,
    subscription_id: Option<String>,
    key_id: String,
    secret: String,
}

/// A customer with a key, on a free plan with `included_units` units, or without a subscription.
async fn customer(billing: &BillingInstance, included_units: Option<i64>) -> Customer {
    match included_units {
        Some(included_units) => {
            let plan = billing_pb::CreatePlanRequest {
                price_micros: 0,
                included_units,
                ..plan_request(&unique_code())
            };
            plan_customer(billing, plan).await
        }
        None => {
            let mut admin = billing.admin().await;
            let customer = admin
                .create_customer(customer_request(&Uuid::new_v4().to_string()))
                .await
                .expect("customer")
                .into_inner();
            let key = issue_key(billing, &customer.id).await;
            Customer {
                id: customer.id,
                subscription_id: None,
                key_id: key.key.expect("key").id,
                secret: key.secret,
            }
        }
    }
}

async fn issue_key(billing: &BillingInstance, customer_id: &str) -> billing_pb::IssuedApiKey {
    billing
        .admin()
        .await
        .issue_api_key(IssueApiKeyRequest {
            customer_id: customer_id.to_owned(),
            name: "test".into(),
        })
        .await
        .expect("key")
        .into_inner()
}

fn assert_problem(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    let problem = answer.json();
    assert_eq!(problem["status"], status);
    assert_eq!(problem["code"], code);
    assert_eq!(
        problem["type"],
        format!(
            "https://docs.example.com/problems/{}",
            code.replace('_', "-")
        )
    );
    assert!(
        problem["title"]
            .as_str()
            .is_some_and(|title| !title.is_empty())
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|detail| !detail.is_empty())
    );
}

#[tokio::test]
async fn an_admitted_request_reaches_the_upstream_with_identity_and_without_the_key() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;
    let client = http_client();

    let answer = send(
        &client,
        get(
            &gateway.url("/v1/things?x=1"),
            &[
                ("authorization", &format!("Bearer {}", customer.secret)),
                ("x-request-id", "req-abc"),
                ("paygate-customer", "someone-else"),
            ],
        ),
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "ok");
    assert_eq!(answer.headers["x-request-id"], "req-abc");
    assert_eq!(
        answer.headers["ratelimit"]
            .to_str()
            .expect("ascii")
            .split(';')
            .nth(1),
        Some("r=9")
    );
    assert!(answer.headers.contains_key("ratelimit-policy"));
    assert_eq!(upstream.hits(), 1);
    let seen = &upstream.seen()[0];
    assert!(!seen.contains_key("authorization"));
    assert_eq!(
        seen.get_all("paygate-customer").iter().collect::<Vec<_>>(),
        [customer.id.as_str()]
    );
    assert_eq!(seen["x-request-id"], "req-abc");
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_keys_get_401_and_the_last_three_look_alike() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let revoked = customer(&billing, Some(10)).await;
    billing
        .admin()
        .await
        .revoke_api_key(RevokeApiKeyRequest {
            key_id: revoked.key_id.clone(),
        })
        .await
        .expect("revoke");
    let unknown = proto::api_key::assemble("0123456789abcdefghijABCDEFGHIJxyz");
    let client = http_client();
    let call = |key: String| {
        let client = client.clone();
        let url = gateway.url("/v1/things");
        async move {
            send(
                &client,
                get(&url, &[("x-api-key", &key), ("x-request-id", "same")]),
            )
            .await
        }
    };

    let missing = send(&client, get(&gateway.url("/v1/things"), &[])).await;
    let malformed = call("pg_live_nonsense".into()).await;
    let not_known = call(unknown).await;
    let was_revoked = call(revoked.secret.clone()).await;

    assert_problem(&missing, 401, "missing_api_key");
    assert!(missing.headers.contains_key("www-authenticate"));
    assert_problem(&malformed, 401, "invalid_api_key");
    assert_eq!(malformed.body, not_known.body);
    assert_eq!(malformed.body, was_revoked.body);
    assert_eq!(
        malformed.headers["www-authenticate"],
        was_revoked.headers["www-authenticate"]
    );
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_used_up_quota_is_402_with_what_was_used_and_when_it_resets() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(2)).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(
            send(
                &client,
                get(&gateway.url("/v1/things"), &[("authorization", &key)]),
            )
            .await,
        );
    }

    assert_eq!(answers[0].status, StatusCode::OK);
    assert_eq!(answers[1].status, StatusCode::OK);
    assert_problem(&answers[2], 402, "quota_exhausted");
    let problem = answers[2].json();
    assert_eq!(problem["limit"], 2);
    assert_eq!(problem["used"], 2);
    assert!(
        problem["resets_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z'))
    );
    assert_eq!(
        problem["actions"]["upgrade"],
        "https://billing.example.com/plans"
    );
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn no_route_no_subscription_a_cancelled_one_and_a_missing_feature_are_refused() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let unsubscribed = customer(&billing, None).await;
    let cancelled = customer(&billing, Some(10)).await;
    let subscribed = customer(&billing, Some(10)).await;
    billing
        .admin()
        .await
        .cancel_subscription(CancelSubscriptionRequest {
            subscription_id: cancelled.subscription_id.clone().expect("subscribed"),
            at_period_end: false,
        })
        .await
        .expect("cancel");
    let client = http_client();
    let with_key = |customer: &Customer, path: &str| {
        get(
            &gateway.url(path),
            &[("authorization", &format!("Bearer {}", customer.secret))],
        )
    };

    let no_route = send(&client, with_key(&subscribed, "/v2/things")).await;
    let required = send(&client, with_key(&unsubscribed, "/v1/things")).await;
    let inactive = send(&client, with_key(&cancelled, "/v1/things")).await;
    let excluded = send(&client, with_key(&subscribed, "/v1/premium/x")).await;

    assert_problem(&no_route, 404, "route_not_found");
    assert_problem(&required, 402, "subscription_required");
    assert_problem(&inactive, 402, "subscription_inactive");
    assert_problem(&excluded, 403, "plan_excludes_route");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn an_upstream_5xx_is_passed_on_and_its_units_are_given_back() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|request| async move {
        let status = if request.uri().path().ends_with("/fail") {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let mut response = Response::new(body("upstream says"));
        *response.status_mut() = status;
        response
    })
    .await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(1)).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let failed = send(
        &client,
        get(&gateway.url("/v1/fail"), &[("authorization", &key)]),
    )
    .await;
    let at_the_edge = send(
        &client,
        get(&gateway.url("/v1/ok"), &[("authorization", &key)]),
    )
    .await;
    let beyond = send(
        &client,
        get(&gateway.url("/v1/ok"), &[("authorization", &key)]),
    )
    .await;

    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.body, "upstream says");
    assert_eq!(at_the_edge.status, StatusCode::OK);
    assert_problem(&beyond, 402, "quota_exhausted");
}

#[tokio::test]
async fn problem_pages_and_health_are_served_by_the_gateway_itself() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let client = http_client();

    let page = send(&client, get(&gateway.url("/problems/quota-exhausted"), &[])).await;
    let health = send(&client, get(&gateway.url("/_paygate/health"), &[])).await;

    assert_eq!(page.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page.body).contains("Quota exhausted"));
    assert_eq!(health.status, StatusCode::OK);
    gateway.shutdown().await;
}

/// Sends raw bytes (for framing HTTP clients refuse to produce) and reads one answer.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let head_end = loop {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(
            read > 0,
            "connection closed before an answer: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..read]);
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let mut headers = http::HeaderMap::new();
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').expect("a header line");
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes()).expect("name"),
            http::HeaderValue::from_str(value.trim()).expect("value"),
        );
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    while received.len() < head_end + length {
        let read = stream.read(&mut buffer).await.expect("read");
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..read]);
    }
    Answer {
        status: StatusCode::from_u16(status).expect("status"),
        headers,
        body: bytes::Bytes::copy_from_slice(
            &received[head_end..(head_end + length).min(received.len())],
        ),
    }
}

#[tokio::test]
async fn conflicting_content_lengths_are_400_and_never_forwarded() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;

    let answer = raw_exchange(
        gateway.addr,
        format!(
            "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            customer.secret
        )
        .as_bytes(),
    )
    .await;

    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_request_framed_both_by_length_and_chunked_is_400_and_never_forwarded() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;

    let answer = raw_exchange(
        gateway.addr,
        format!(
            "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            customer.secret
        )
        .as_bytes(),
    )
    .await;

    assert_problem(&answer, 400, "bad_request");
    assert_eq!(answer.headers["connection"], "close");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_chunked_body_is_forwarded_without_a_content_length() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|request| async move {
        use http_body_util::BodyExt;
        let received = request
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Response::new(body(received))
    })
    .await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;

    let answer = raw_exchange(
        gateway.addr,
        format!(
            "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            customer.secret
        )
        .as_bytes(),
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "abc");
    assert!(!upstream.seen()[0].contains_key("content-length"));
}

/// Starts an upstream that reads each request's whole body before answering `200 OK` (or `400` when the
/// body broke off), so a body the gateway cannot finish is noticed while it is being forwarded.
async fn spawn_body_reading_upstream() -> integration_tests::Upstream {
    spawn_upstream(|request| async move {
        use http_body_util::BodyExt;
        match request.into_body().collect().await {
            Ok(received) => Response::new(body(received.to_bytes())),
            Err(_) => {
                let mut response = Response::new(body("body broke off"));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_body_that_breaks_chunked_framing_is_400_with_close_and_gives_its_units_back() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_body_reading_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(2)).await;
    let client = http_client();
    let head = format!(
        "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        customer.secret
    );

    let oversized_chunk = raw_exchange(
        gateway.addr,
        format!("{head}5\r\nhello\r\nfffffffffffffffffffffff\r\nabc").as_bytes(),
    )
    .await;
    let bare_lf_in_extension = raw_exchange(
        gateway.addr,
        format!("{head}5;ext=1\nhello\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    let key = format!("Bearer {}", customer.secret);
    let both_units_left = [
        send(
            &client,
            get(&gateway.url("/v1/ok"), &[("authorization", &key)]),
        )
        .await,
        send(
            &client,
            get(&gateway.url("/v1/ok"), &[("authorization", &key)]),
        )
        .await,
    ];

    for broken in [&oversized_chunk, &bare_lf_in_extension] {
        assert_problem(broken, 400, "bad_request");
        assert_eq!(broken.headers["connection"], "close");
    }
    for answer in &both_units_left {
        assert_eq!(answer.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_transfer_coding_besides_chunked_is_501_and_never_forwarded() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_body_reading_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;

    let answer = raw_exchange(
        gateway.addr,
        format!(
            "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            customer.secret
        )
        .as_bytes(),
    )
    .await;

    assert_problem(&answer, 501, "unsupported_transfer_coding");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_before_it_is_read_and_charges_nothing() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let limited = format!(
        "{}\n[limits]\nmax_body_bytes = 1024\n",
        routes(upstream.addr)
    );
    let gateway = spawn_gateway(&billing, &usage, &limited).await;
    let customer = customer(&billing, Some(1)).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);
    let big = http::Request::post(gateway.url("/v1/upload"))
        .header("authorization", &key)
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'x';
            4096
        ])))
        .expect("request");

    let refused = send(&client, big).await;
    let then = send(
        &client,
        get(&gateway.url("/v1/x"), &[("authorization", &key)]),
    )
    .await;

    assert_problem(&refused, 413, "payload_too_large");
    assert_eq!(
        then.status,
        StatusCode::OK,
        "the only unit of the quota was still there"
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn too_many_headers_are_refused_with_431() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let many: String = (0..150)
        .map(|index| format!("X-Filler-{index}: {index}\r\n"))
        .collect();

    let answer = raw_exchange(
        gateway.addr,
        format!("GET /v1/x HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;

    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(upstream.hits(), 0);
}

async fn plan_customer(billing: &BillingInstance, plan: billing_pb::CreatePlanRequest) -> Customer {
    let mut admin = billing.admin().await;
    let plan = admin.create_plan(plan).await.expect("plan").into_inner();
    let customer = admin
        .create_customer(customer_request(&Uuid::new_v4().to_string()))
        .await
        .expect("customer")
        .into_inner();
    let subscription = admin
        .create_subscription(CreateSubscriptionRequest {
            customer_id: customer.id.clone(),
            plan_id: plan.id,
        })
        .await
        .expect("subscription")
        .into_inner();
    let key = issue_key(billing, &customer.id).await;
    Customer {
        id: customer.id,
        subscription_id: Some(subscription.id),
        key_id: key.key.expect("key").id,
        secret: key.secret,
    }
}

fn unique_code() -> String {
    format!("p{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_burst_over_the_rate_limit_is_429_with_retry_after_and_ratelimit_headers() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let plan = billing_pb::CreatePlanRequest {
        price_micros: 0,
        rate_limit: 1,
        rate_period_ms: 60_000,
        burst: 1,
        ..plan_request(&unique_code())
    };
    let customer = plan_customer(&billing, plan).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let first = send(
        &client,
        get(&gateway.url("/v1/x"), &[("authorization", &key)]),
    )
    .await;
    let second = send(
        &client,
        get(&gateway.url("/v1/x"), &[("authorization", &key)]),
    )
    .await;

    assert_eq!(first.status, StatusCode::OK);
    assert_problem(&second, 429, "rate_limited");
    let retry_after: u64 = second.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (59..=60).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert!(
        second.headers["ratelimit-policy"]
            .to_str()
            .expect("ascii")
            .contains("\"rate\";q=1;w=60")
    );
    assert!(second.headers.contains_key("ratelimit"));
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn a_payment_past_due_beyond_grace_is_402_and_inside_grace_passes_with_a_warning() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let no_grace = plan_customer(
        &billing,
        billing_pb::CreatePlanRequest {
            grace_period_seconds: 0,
            ..plan_request(&unique_code())
        },
    )
    .await;
    let with_grace = plan_customer(&billing, plan_request(&unique_code())).await;
    let client = http_client();

    let refused = send(
        &client,
        get(&gateway.url("/v1/x"), &[("x-api-key", &no_grace.secret)]),
    )
    .await;
    let warned = send(
        &client,
        get(&gateway.url("/v1/x"), &[("x-api-key", &with_grace.secret)]),
    )
    .await;

    assert_problem(&refused, 402, "payment_past_due");
    assert_eq!(warned.status, StatusCode::OK);
    assert!(warned.headers.contains_key("paygate-payment-warning"));
}

#[tokio::test]
async fn credits_exhausted_is_402_and_a_top_up_admits_again() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = plan_customer(
        &billing,
        billing_pb::CreatePlanRequest {
            price_micros: 0,
            included_units: 0,
            overage_mode: billing_pb::OverageMode::Credits.into(),
            unit_price_micros: 1_000_000,
            ..plan_request(&unique_code())
        },
    )
    .await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let refused = send(
        &client,
        get(&gateway.url("/v1/x"), &[("authorization", &key)]),
    )
    .await;
    billing
        .admin()
        .await
        .record_payment(integration_tests::payment_request(
            "top-up-1",
            &customer.id,
            billing_pb::PaymentPurpose::CreditTopUp,
            billing_pb::PaymentOutcome::Succeeded,
            5_000_000,
        ))
        .await
        .expect("top-up");
    // The top-up travels billing → change feed → usage; wait for it, bounded.
    let admitted = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let answer = send(
                &client,
                get(&gateway.url("/v1/x"), &[("authorization", &key)]),
            )
            .await;
            if answer.status == StatusCode::OK {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("admitted within 5 s of the top-up");

    assert_problem(&refused, 402, "credits_exhausted");
    assert_eq!(refused.json()["balance"]["amount"], "0.00");
    assert_eq!(
        refused.json()["actions"]["top_up"],
        "https://billing.example.com/top-up"
    );
    assert_eq!(admitted.headers["paygate-credits-remaining"], "4.00 USD");
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_a_slow_one_504_and_both_give_the_units_back() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let slow = spawn_upstream(|_| async {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        Response::new(body("late"))
    })
    .await;
    let fast = spawn_ok_upstream().await;
    let routes = format!(
        r#"
        problem_base_url = "https://docs.example.com/problems"
        [[routes]]
        prefix = "/down"
        upstream = "http://{closed_port}"
        [[routes]]
        prefix = "/slow"
        upstream = "http://{}"
        timeout_ms = 200
        [[routes]]
        prefix = "/v1"
        upstream = "http://{}"
        "#,
        slow.addr, fast.addr
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let customer = customer(&billing, Some(1)).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let unreachable = send(
        &client,
        get(&gateway.url("/down/x"), &[("authorization", &key)]),
    )
    .await;
    let timed_out = send(
        &client,
        get(&gateway.url("/slow/x"), &[("authorization", &key)]),
    )
    .await;
    let at_the_edge = send(
        &client,
        get(&gateway.url("/v1/x"), &[("authorization", &key)]),
    )
    .await;

    assert_problem(&unreachable, 502, "upstream_unavailable");
    assert_problem(&timed_out, 504, "upstream_timeout");
    assert_eq!(
        at_the_edge.status,
        StatusCode::OK,
        "both failures were refunded"
    );
}

#[tokio::test]
async fn a_hanging_billing_is_503_with_retry_after_and_once_the_breaker_opens_answers_are_fast() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let tarpit = integration_tests::spawn_tarpit().await;
    let gateway =
        integration_tests::spawn_gateway_at(tarpit.addr, usage.addr, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(
            send(
                &client,
                get(&gateway.url("/v1/x"), &[("authorization", &key)]),
            )
            .await,
        );
    }
    let started = std::time::Instant::now();
    let after_open = send(
        &client,
        get(&gateway.url("/v1/x"), &[("authorization", &key)]),
    )
    .await;
    let elapsed = started.elapsed();

    for answer in answers.iter().chain([&after_open]) {
        assert_problem(answer, 503, "billing_unavailable");
        assert!(answer.headers.contains_key("retry-after"));
    }
    assert!(
        elapsed < integration_tests::TEST_BACKEND_DEADLINE / 5,
        "with the breaker open the answer took {elapsed:?}"
    );
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_let_exactly_the_quota_through_of_two_thousand_concurrent_requests() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let first = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let second = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(500)).await;
    let key = format!("Bearer {}", customer.secret);
    let client = http_client();

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..2_000 {
        let url = if index % 2 == 0 {
            first.url("/v1/x")
        } else {
            second.url("/v1/x")
        };
        let (client, key) = (client.clone(), key.clone());
        tasks.spawn(async move { send(&client, get(&url, &[("authorization", &key)])).await });
    }
    let mut ok = 0;
    let mut exhausted = 0;
    while let Some(answer) = tasks.join_next().await {
        let answer = answer.expect("task");
        match answer.status.as_u16() {
            200 => ok += 1,
            402 if answer.json()["code"] == "quota_exhausted" => exhausted += 1,
            other => panic!("unexpected answer {other}: {:?}", answer.body),
        }
    }

    assert_eq!(ok, 500);
    assert_eq!(exhausted, 1_500);
    assert_eq!(upstream.hits(), 500);
}

#[tokio::test]
async fn a_revoked_key_is_refused_by_every_gateway_within_a_second_without_a_restart() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let first = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let second = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(100)).await;
    let key = format!("Bearer {}", customer.secret);
    let client = http_client();
    for gateway in [&first, &second] {
        let warm = send(
            &client,
            get(&gateway.url("/v1/x"), &[("authorization", &key)]),
        )
        .await;
        assert_eq!(warm.status, StatusCode::OK);
    }

    billing
        .admin()
        .await
        .revoke_api_key(RevokeApiKeyRequest {
            key_id: customer.key_id.clone(),
        })
        .await
        .expect("revoke");
    let revoked_at = std::time::Instant::now();
    let mut refused_after = Vec::new();
    for gateway in [&first, &second] {
        let refused = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            loop {
                let answer = send(
                    &client,
                    get(&gateway.url("/v1/x"), &[("authorization", &key)]),
                )
                .await;
                if answer.status == StatusCode::UNAUTHORIZED {
                    return answer;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("refused within a second of the revocation");
        assert_problem(&refused, 401, "invalid_api_key");
        refused_after.push(revoked_at.elapsed());
    }

    assert!(
        refused_after
            .iter()
            .all(|elapsed| *elapsed < std::time::Duration::from_secs(1))
    );
}

#[tokio::test]
async fn server_sent_events_reach_the_client_before_the_upstream_has_finished() {
    use http_body_util::BodyExt;

    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = std::sync::Arc::new(tokio::sync::Mutex::new(Some(released)));
    let upstream = spawn_upstream(move |_| {
        let released = released.clone();
        async move {
            let (frames, stream) = tokio::sync::mpsc::channel::<
                Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
            >(4);
            tokio::spawn(async move {
                let _ = frames
                    .send(Ok(hyper::body::Frame::data("data: one\n\n".into())))
                    .await;
                if let Some(released) = released.lock().await.take() {
                    let _ = released.await;
                }
                let _ = frames
                    .send(Ok(hyper::body::Frame::data("data: two\n\n".into())))
                    .await;
            });
            let body = http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(stream),
            )
            .boxed();
            let mut response = Response::new(body);
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("text/event-stream"),
            );
            response
        }
    })
    .await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;
    let client = http_client();

    let response = client
        .request(get(
            &gateway.url("/v1/events"),
            &[("x-api-key", &customer.secret)],
        ))
        .await
        .expect("an answer");
    let mut events = response.into_body();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), events.frame())
        .await
        .expect("the first event arrives while the upstream is still sending")
        .expect("a frame")
        .expect("no error");
    release.send(()).expect("the upstream waits");
    let rest = events.collect().await.expect("the rest").to_bytes();

    assert_eq!(first.into_data().expect("data"), "data: one\n\n");
    assert_eq!(rest, "data: two\n\n");
}

#[tokio::test]
async fn headers_the_client_sends_are_not_seen_by_the_upstream_as_sent() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;
    let request = format!(
        "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close, X-Secret\r\nX-Secret: hush\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9v\r\nAuthorization: Bearer {}\r\n\
         Paygate-Customer: someone-else\r\nX-Forwarded-For: 10.0.0.99\r\n\r\n",
        customer.secret
    );

    let answer = raw_exchange(gateway.addr, request.as_bytes()).await;

    assert_eq!(answer.status, StatusCode::OK);
    let seen = &upstream.seen()[0];
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "authorization",
    ] {
        assert!(!seen.contains_key(gone), "{gone} reached the upstream");
    }
    assert!(
        seen.get_all("connection")
            .iter()
            .all(|value| value != "close, X-Secret")
    );
    assert_eq!(
        seen.get_all("paygate-customer").iter().collect::<Vec<_>>(),
        [customer.id.as_str()]
    );
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(!seen.iter().any(|(_, value)| {
        value
            .as_bytes()
            .windows(8)
            .any(|window| window == b"pg_live_")
    }));
}

#[tokio::test]
async fn client_address_headers_are_set_by_the_gateway_and_extended_only_behind_trusted_proxies() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let direct = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let behind_proxy = spawn_gateway(
        &billing,
        &usage,
        &format!(
            "trusted_proxies = [\"127.0.0.1\"]\n{}",
            routes(upstream.addr)
        ),
    )
    .await;
    let customer = customer(&billing, Some(10)).await;
    let client = http_client();
    let claims = [
        ("authorization", format!("Bearer {}", customer.secret)),
        ("x-forwarded-for", "198.51.100.7".to_owned()),
        ("x-real-ip", "6.6.6.6".to_owned()),
        ("true-client-ip", "6.6.6.6".to_owned()),
        ("x-client-ip", "6.6.6.6".to_owned()),
        ("cf-connecting-ip", "6.6.6.6".to_owned()),
    ];
    let claims: Vec<(&str, &str)> = claims
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();

    let from_anyone = send(&client, get(&direct.url("/v1/x"), &claims)).await;
    let from_proxy = send(&client, get(&behind_proxy.url("/v1/x"), &claims)).await;

    assert_eq!(from_anyone.status, StatusCode::OK);
    assert_eq!(from_proxy.status, StatusCode::OK);
    let seen = upstream.seen();
    for headers in &seen {
        for gone in ["true-client-ip", "x-client-ip", "cf-connecting-ip"] {
            assert!(!headers.contains_key(gone), "{gone} reached the upstream");
        }
    }
    assert_eq!(seen[0]["x-real-ip"], "127.0.0.1");
    assert_eq!(seen[0]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen[1]["x-real-ip"], "198.51.100.7");
    assert_eq!(seen[1]["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
}

#[tokio::test]
async fn an_open_route_passes_a_known_key_a_bounded_number_of_units_marked_degraded_while_usage_is_down()
 {
    let billing = billing_now().await;
    let upstream = spawn_ok_upstream().await;
    let tarpit = integration_tests::spawn_tarpit().await;
    let routes = format!(
        r#"
        problem_base_url = "https://docs.example.com/problems"
        [[routes]]
        prefix = "/v1"
        upstream = "http://{}"
        failure_mode = "open"
        open_budget = 2
        "#,
        upstream.addr
    );
    let gateway = integration_tests::spawn_gateway_at(billing.addr, tarpit.addr, &routes).await;
    let customer = customer(&billing, Some(10)).await;
    let client = http_client();
    let key = format!("Bearer {}", customer.secret);

    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(
            send(
                &client,
                get(&gateway.url("/v1/x"), &[("authorization", &key)]),
            )
            .await,
        );
    }

    for passed in &answers[..2] {
        assert_eq!(passed.status, StatusCode::OK);
        assert_eq!(passed.headers["paygate-degraded"], "true");
    }
    assert_problem(&answers[2], 503, "billing_unavailable");
    assert_eq!(upstream.hits(), 2);
    for seen in upstream.seen() {
        assert_eq!(seen["paygate-customer"], customer.id.as_str());
    }
}

#[tokio::test]
async fn clients_may_speak_http2() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let answer = send(
        &client,
        get(&gateway.url("/v1/x"), &[("x-api-key", &customer.secret)]),
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "ok");
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_is_413_and_refunded() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|request| async move {
        use http_body_util::BodyExt;
        let _ = request.into_body().collect().await;
        Response::new(body("read"))
    })
    .await;
    let limited = format!(
        "{}\n[limits]\nmax_body_bytes = 1024\n",
        routes(upstream.addr)
    );
    let gateway = spawn_gateway(&billing, &usage, &limited).await;
    let customer = customer(&billing, Some(1)).await;
    let chunk = "x".repeat(2048);

    let answer = raw_exchange(
        gateway.addr,
        format!(
            "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{chunk}\r\n0\r\n\r\n",
            customer.secret
        )
        .as_bytes(),
    )
    .await;
    let then = send(
        &http_client(),
        get(&gateway.url("/v1/x"), &[("x-api-key", &customer.secret)]),
    )
    .await;

    assert_problem(&answer, 413, "payload_too_large");
    assert_eq!(
        then.status,
        StatusCode::OK,
        "the unit taken for the refused body was given back"
    );
}

#[tokio::test]
async fn a_client_reusing_one_request_id_is_charged_for_every_request() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(2)).await;
    let client = http_client();
    let same_id = [
        ("x-api-key", customer.secret.as_str()),
        ("x-request-id", "always-the-same"),
    ];

    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            send(&client, get(&gateway.url("/v1/x"), &same_id))
                .await
                .status
                .as_u16(),
        );
    }

    assert_eq!(statuses, [200, 200, 402]);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_ok_upstream().await;
    let impatient = format!(
        "{}\n[limits]\nheader_read_timeout_ms = 200\n",
        routes(upstream.addr)
    );
    let gateway = spawn_gateway(&billing, &usage, &impatient).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Slow")
        .await
        .expect("write");

    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut rest),
    )
    .await;

    assert!(closed.is_ok(), "the gateway kept a half-sent request open");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let (arrived, arrival) = tokio::sync::oneshot::channel::<()>();
    let arrived = std::sync::Arc::new(std::sync::Mutex::new(Some(arrived)));
    let upstream = spawn_upstream(move |_| {
        let arrived = arrived.clone();
        async move {
            if let Some(arrived) = arrived.lock().expect("lock").take() {
                let _ = arrived.send(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Response::new(body("finished"))
        }
    })
    .await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(10)).await;
    let url = gateway.url("/v1/slow");
    let secret = customer.secret.clone();
    let in_flight =
        tokio::spawn(
            async move { send(&http_client(), get(&url, &[("x-api-key", &secret)])).await },
        );
    arrival.await.expect("the request reached the upstream");

    gateway.shutdown().await;
    let answer = in_flight.await.expect("task");

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "finished");
}

#[tokio::test]
async fn a_refund_that_cannot_reach_usage_is_retried_until_it_lands() {
    let billing = billing_now().await;
    let prefix = integration_tests::unique_prefix();
    let usage = integration_tests::spawn_usage_with_prefix(&billing, &prefix).await;
    let usage_addr = usage.addr;
    let (arrived, arrival) = tokio::sync::oneshot::channel::<()>();
    let (answer, answer_now) = tokio::sync::oneshot::channel::<()>();
    let hooks = std::sync::Arc::new(std::sync::Mutex::new(Some((arrived, answer_now))));
    let upstream = spawn_upstream(move |_| {
        let hooks = hooks.clone();
        async move {
            let taken = hooks.lock().expect("lock").take();
            if let Some((arrived, answer_now)) = taken {
                let _ = arrived.send(());
                let _ = answer_now.await;
                let mut failed = Response::new(body("down"));
                *failed.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return failed;
            }
            Response::new(body("ok"))
        }
    })
    .await;
    let gateway = spawn_gateway(&billing, &usage, &routes(upstream.addr)).await;
    let customer = customer(&billing, Some(1)).await;
    let (url, secret) = (gateway.url("/v1/x"), customer.secret.clone());
    let failing =
        tokio::spawn(
            async move { send(&http_client(), get(&url, &[("x-api-key", &secret)])).await },
        );
    arrival.await.expect("the request reached the upstream");

    usage.shutdown().await; // the unit was taken; now nobody can give it back
    answer.send(()).expect("the upstream waits");
    let failed = failing.await.expect("task");
    let restarted = integration_tests::spawn_usage_at(&billing, &prefix, usage_addr).await;
    let readmitted = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let answer = send(
                &http_client(),
                get(&gateway.url("/v1/x"), &[("x-api-key", &customer.secret)]),
            )
            .await;
            if answer.status == StatusCode::OK {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the refund landed once usage was back");

    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(readmitted.body, "ok");
    restarted.shutdown().await;
}
