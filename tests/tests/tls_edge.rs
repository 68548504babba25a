//! TLS at the gateway's two HTTP edges, with certificates from throwaway CAs: `https://` upstreams verified
//! against a route's `ca_file` (HTTP/2 or HTTP/1.1 by ALPN, refused with a clear code and refunded when
//! the certificate is not trusted), and the gateway's own HTTPS listener, reloaded when its files change.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use integration_tests::{
    Answer, BillingInstance, SERVICE_TOKEN, TEST_BACKEND_DEADLINE, UpstreamBody, UsageInstance,
    body, customer_request, fresh_database, get, http_client, plan_request, send,
    spawn_billing_with_clock, spawn_gateway, spawn_usage,
    tls::{IssuedCert, TestCa},
};
use proto::billing::v1::{self as billing_pb, CreateSubscriptionRequest, IssueApiKeyRequest};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::oneshot, task::JoinHandle};
use uuid::Uuid;

const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1"];

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a TLS upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    /// The server name the client asked for in its TLS ClientHello.
    sni: Option<String>,
    /// The host as the upstream read it: `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    host: Option<String>,
    headers: HeaderMap,
}

/// An HTTPS server standing in for the API behind the gateway, offering `alpn` only.
struct TlsUpstream {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: JoinHandle<()>,
}

impl TlsUpstream {
    fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Returns how many TLS handshakes completed, one per connection the gateway opened.
    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

async fn spawn_tls_upstream<F, Fut>(cert: &IssuedCert, alpn: &[&str], handler: F) -> TlsUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
{
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the upstream's certificate");
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("the upstream's key");
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a usable certificate");
    config.alpn_protocols = alpn
        .iter()
        .map(|protocol| protocol.as_bytes().to_vec())
        .collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind the upstream");
    let addr = listener.local_addr().expect("an address");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let (task_handshakes, task_seen) = (handshakes.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handshakes, seen, handler) = (
                acceptor.clone(),
                task_handshakes.clone(),
                task_seen.clone(),
                handler.clone(),
            );
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let sni = stream.get_ref().1.server_name().map(str::to_owned);
                let service = service_fn(move |request: Request<Incoming>| {
                    let host = request
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|host| host.to_str().ok())
                        .map(str::to_owned)
                        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
                    seen.lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(Seen {
                            version: request.version(),
                            sni: sni.clone(),
                            host,
                            headers: request.headers().clone(),
                        });
                    let answer = handler(request);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TlsUpstream {
        addr,
        handshakes,
        seen,
        _task: task,
    }
}

async fn spawn_ok_tls_upstream(cert: &IssuedCert, alpn: &[&str]) -> TlsUpstream {
    spawn_tls_upstream(cert, alpn, |_| async { Response::new(body("ok")) }).await
}

/// Billing with its clock at the real now, so entitlements' lifetimes are in the future.
async fn billing_now() -> BillingInstance {
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    spawn_billing_with_clock(fresh_database().await, clock).await
}

/// Returns the API key of a new customer on a free plan of `included_units`.
async fn customer_key(billing: &BillingInstance, included_units: i64) -> String {
    let mut admin = billing.admin().await;
    let plan = admin
        .create_plan(billing_pb::CreatePlanRequest {
            price_micros: 0,
            included_units,
            ..plan_request(&format!("p{}", Uuid::new_v4().simple()))
        })
        .await
        .expect("plan")
        .into_inner();
    let customer = admin
        .create_customer(customer_request(&Uuid::new_v4().to_string()))
        .await
        .expect("customer")
        .into_inner();
    admin
        .create_subscription(CreateSubscriptionRequest {
            customer_id: customer.id.clone(),
            plan_id: plan.id,
        })
        .await
        .expect("subscription");
    admin
        .issue_api_key(IssueApiKeyRequest {
            customer_id: customer.id,
            name: "test".into(),
        })
        .await
        .expect("key")
        .into_inner()
        .secret
}

fn assert_problem(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    assert_eq!(answer.json()["code"], code, "{:?}", answer.body);
}

/// A gateway in this process serving HTTPS with `tls`.
struct TlsGateway {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

impl TlsGateway {
    /// Returns `https://localhost:<port><path>`, so clients ask for the name the certificates carry.
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("gateway failed: {error}"),
            Err(error) => panic!("gateway task failed: {error}"),
        }
    }
}

async fn spawn_tls_gateway(
    billing: &BillingInstance,
    usage: &UsageInstance,
    routes: &str,
    tls: gateway::tls::ServerTls,
) -> TlsGateway {
    let (file, table) = gateway::routes::parse_routes_file(routes)
        .unwrap_or_else(|error| panic!("bad routes: {error}"));
    let backends = gateway::backends::Backends::new(
        gateway::backends::channel(&format!("http://{}", billing.addr)).expect("billing URL"),
        gateway::backends::channel(&format!("http://{}", usage.addr)).expect("usage URL"),
        proto::auth::BearerToken::new(SERVICE_TOKEN).expect("a valid token"),
        TEST_BACKEND_DEADLINE,
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind the gateway");
    let addr = listener.local_addr().expect("an address");
    let (stop, stopped) = oneshot::channel::<()>();
    let gateway = gateway::gateway(
        file,
        table,
        backends,
        Duration::from_millis(50),
        gateway::config::Leases::On,
    );
    let serve = gateway::serve_with_tls(listener, gateway, Some(tls), async move {
        let _ = stopped.await;
    });
    let task = tokio::spawn(async move { serve.await.map_err(|error| format!("{error:#}")) });
    TlsGateway { addr, stop, task }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS client trusting `ca` only, speaking HTTP/2 or HTTP/1.1 (offered by ALPN accordingly).
fn https_client(ca: &TestCa, version: Version) -> HttpsClient {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("the CA's PEM"))
        .expect("a CA certificate");
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let http2 = version == Version::HTTP_2;
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

async fn send_https(client: &HttpsClient, request: Request<Full<Bytes>>) -> Answer {
    let response = client.request(request).await.expect("the gateway answers");
    let (parts, incoming) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: incoming.collect().await.expect("a whole body").to_bytes(),
    }
}

/// A routes file with one route, `/v1`, to `upstream`, verified with `ca_file` when given.
fn one_route(upstream: &str, ca_file: Option<&std::path::Path>) -> String {
    let ca_file = ca_file
        .map(|file| format!("ca_file = \"{}\"", file.display()))
        .unwrap_or_default();
    format!("[[routes]]\nprefix = \"/v1\"\nupstream = \"{upstream}\"\n{ca_file}\n")
}

#[tokio::test]
async fn an_https_upstream_offering_only_h2_is_reached_over_http2_with_sni_and_its_body_streamed() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let ca = TestCa::new("upstream-h2");
    let (release, released) = oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let upstream = spawn_tls_upstream(&ca.issue("upstream", LOOPBACK_NAMES), &["h2"], move |_| {
        let released = released.clone();
        async move {
            let (frames, stream) =
                tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, Infallible>>(4);
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
            Response::new(
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(
                    stream,
                ))
                .boxed(),
            )
        }
    })
    .await;
    let routes = one_route(
        &format!("https://localhost:{}", upstream.addr.port()),
        Some(&ca.cert_file()),
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let key = customer_key(&billing, 10).await;

    let response = http_client()
        .request(get(&gateway.url("/v1/events"), &[("x-api-key", &key)]))
        .await
        .expect("an answer");
    let status = response.status();
    let mut events = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), events.frame())
        .await
        .expect("the first event arrives while the upstream is still sending")
        .expect("a frame")
        .expect("no error");
    release.send(()).expect("the upstream waits");
    let rest = events.collect().await.expect("the rest").to_bytes();

    assert_eq!(status, StatusCode::OK);
    assert_eq!(first.into_data().expect("data"), "data: one\n\n");
    assert_eq!(rest, "data: two\n\n");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(seen[0].sni.as_deref(), Some("localhost"));
    assert_eq!(
        seen[0].host,
        Some(format!("localhost:{}", upstream.addr.port())),
        "the upstream is asked for by its own name"
    );
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn an_https_upstream_offering_only_http1_is_reached_over_http1_on_one_reused_connection() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let ca = TestCa::new("upstream-h1");
    let upstream =
        spawn_ok_tls_upstream(&ca.issue("upstream", LOOPBACK_NAMES), &["http/1.1"]).await;
    let routes = one_route(
        &format!("https://127.0.0.1:{}", upstream.addr.port()),
        Some(&ca.cert_file()),
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let key = customer_key(&billing, 10).await;
    let client = http_client();

    let first = send(&client, get(&gateway.url("/v1/a"), &[("x-api-key", &key)])).await;
    let second = send(&client, get(&gateway.url("/v1/b"), &[("x-api-key", &key)])).await;

    assert_eq!((first.status, first.body), (StatusCode::OK, "ok".into()));
    assert_eq!((second.status, second.body), (StatusCode::OK, "ok".into()));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|seen| seen.version == Version::HTTP_11));
    assert_eq!(
        seen[0].host,
        Some(format!("127.0.0.1:{}", upstream.addr.port()))
    );
    assert_eq!(upstream.handshakes(), 1, "the connection is reused");
}

#[tokio::test]
async fn an_upstream_certificate_from_another_ca_is_502_upstream_tls_and_costs_nothing() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let (trusted, other) = (TestCa::new("trusted"), TestCa::new("other"));
    let impostor = spawn_ok_tls_upstream(
        &other.issue("impostor", LOOPBACK_NAMES),
        &["h2", "http/1.1"],
    )
    .await;
    let genuine = spawn_ok_tls_upstream(
        &trusted.issue("genuine", LOOPBACK_NAMES),
        &["h2", "http/1.1"],
    )
    .await;
    let routes = format!(
        r#"
        [[routes]]
        prefix = "/impostor"
        upstream = "https://localhost:{}"
        ca_file = "{ca}"
        [[routes]]
        prefix = "/v1"
        upstream = "https://localhost:{}"
        ca_file = "{ca}"
        "#,
        impostor.addr.port(),
        genuine.addr.port(),
        ca = trusted.cert_file().display(),
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let key = customer_key(&billing, 1).await;
    let client = http_client();

    let refused = send(
        &client,
        get(&gateway.url("/impostor/x"), &[("x-api-key", &key)]),
    )
    .await;
    let at_the_edge = send(&client, get(&gateway.url("/v1/x"), &[("x-api-key", &key)])).await;
    let beyond = send(&client, get(&gateway.url("/v1/x"), &[("x-api-key", &key)])).await;

    assert_problem(&refused, 502, "upstream_tls");
    assert!(impostor.seen().is_empty(), "nothing reached the impostor");
    assert_eq!(
        at_the_edge.status,
        StatusCode::OK,
        "the refused request was refunded"
    );
    assert_problem(&beyond, 402, "quota_exhausted");
}

#[tokio::test]
async fn an_upstream_certificate_for_another_name_is_refused() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let ca = TestCa::new("misnamed");
    let upstream = spawn_ok_tls_upstream(
        &ca.issue("elsewhere", &["elsewhere.example"]),
        &["http/1.1"],
    )
    .await;
    let routes = one_route(
        &format!("https://localhost:{}", upstream.addr.port()),
        Some(&ca.cert_file()),
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let key = customer_key(&billing, 10).await;

    let refused = send(
        &http_client(),
        get(&gateway.url("/v1/x"), &[("x-api-key", &key)]),
    )
    .await;

    assert_problem(&refused, 502, "upstream_tls");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn the_gateway_serves_https_over_h1_and_h2_and_tells_the_upstream_the_scheme_was_https() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let ca = TestCa::new("gateway");
    let served = ca.issue("gateway", LOOPBACK_NAMES);
    let upstream = integration_tests::spawn_ok_upstream().await;
    let tls =
        gateway::tls::ServerTls::load(&served.cert_file, &served.key_file).expect("a usable pair");
    let gateway = spawn_tls_gateway(
        &billing,
        &usage,
        &one_route(&format!("http://{}", upstream.addr), None),
        tls,
    )
    .await;
    let key = customer_key(&billing, 10).await;

    let over_h1 = send_https(
        &https_client(&ca, Version::HTTP_11),
        get(&gateway.url("/v1/x"), &[("x-api-key", &key)]),
    )
    .await;
    let over_h2 = send_https(
        &https_client(&ca, Version::HTTP_2),
        get(&gateway.url("/v1/x"), &[("x-api-key", &key)]),
    )
    .await;
    let health = send_https(
        &https_client(&ca, Version::HTTP_2),
        get(&gateway.url("/_paygate/health"), &[]),
    )
    .await;

    assert_eq!(
        (over_h1.status, over_h1.body),
        (StatusCode::OK, "ok".into())
    );
    assert_eq!(
        (over_h2.status, over_h2.body),
        (StatusCode::OK, "ok".into())
    );
    assert_eq!(health.status, StatusCode::OK);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for headers in &seen {
        assert_eq!(headers["x-forwarded-proto"], "https");
        let forwarded = headers["forwarded"].to_str().expect("ascii");
        assert!(forwarded.contains("proto=https"), "{forwarded}");
        assert_eq!(
            headers["x-forwarded-host"],
            format!("localhost:{}", gateway.addr.port())
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_client_trusting_another_ca_cannot_connect_to_the_gateway() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let (ca, other) = (TestCa::new("gateway"), TestCa::new("stranger"));
    let served = ca.issue("gateway", LOOPBACK_NAMES);
    let tls =
        gateway::tls::ServerTls::load(&served.cert_file, &served.key_file).expect("a usable pair");
    let gateway = spawn_tls_gateway(
        &billing,
        &usage,
        &one_route("http://127.0.0.1:9", None),
        tls,
    )
    .await;

    let refused = https_client(&other, Version::HTTP_11)
        .request(get(&gateway.url("/_paygate/health"), &[]))
        .await;

    let error = refused.expect_err("the gateway's certificate is not trusted");
    let chain = format!("{:?}", error);
    assert!(chain.contains("UnknownIssuer"), "{chain}");
}

#[tokio::test]
async fn a_client_that_never_finishes_the_tls_handshake_is_disconnected_at_the_head_deadline() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let ca = TestCa::new("gateway");
    let served = ca.issue("gateway", LOOPBACK_NAMES);
    let tls =
        gateway::tls::ServerTls::load(&served.cert_file, &served.key_file).expect("a usable pair");
    let routes = format!(
        "[limits]\nheader_read_timeout_ms = 300\n{}",
        one_route("http://127.0.0.1:9", None)
    );
    let gateway = spawn_tls_gateway(&billing, &usage, &routes, tls).await;
    let mut stalled = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("connect");
    // The start of a TLS handshake record announcing 512 bytes that never come.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    let started = Instant::now();

    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut rest),
    )
    .await;

    assert!(ended.is_ok(), "the connection is still open after 5 s");
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn new_certificate_files_are_served_to_new_connections_without_a_restart() {
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let (first_ca, next_ca) = (TestCa::new("first"), TestCa::new("next"));
    let (first, next) = (
        first_ca.issue("first", LOOPBACK_NAMES),
        next_ca.issue("next", LOOPBACK_NAMES),
    );
    let cert_file = first_ca.dir().join("served.pem");
    let key_file = first_ca.dir().join("served-key.pem");
    std::fs::write(&cert_file, &first.cert_pem).expect("write");
    std::fs::write(&key_file, &first.key_pem).expect("write");
    let tls = gateway::tls::ServerTls::load(&cert_file, &key_file).expect("a usable pair");
    let gateway = spawn_tls_gateway(
        &billing,
        &usage,
        &one_route("http://127.0.0.1:9", None),
        tls.clone(),
    )
    .await;
    let health = |ca: &TestCa| {
        // A new client each time, so each attempt is a new connection and a new handshake.
        https_client(ca, Version::HTTP_11).request(get(&gateway.url("/_paygate/health"), &[]))
    };
    let before = health(&first_ca).await.map(|answer| answer.status());

    // A half-replaced pair (the next certificate with the first key) is refused and the first stays.
    std::fs::write(&cert_file, &next.cert_pem).expect("write");
    let half = tls.reload();
    let during = health(&first_ca).await.map(|answer| answer.status());
    replace_file(&key_file, &next.key_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        if let Ok(answer) = health(&next_ca).await {
            break answer.status();
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let old_trust = health(&first_ca).await;

    assert_eq!(before.expect("the first certificate"), StatusCode::OK);
    let refusal = half.expect_err("a certificate with another's key is refused");
    assert!(
        refusal.to_string().contains("do not make a pair"),
        "{refusal}"
    );
    assert_eq!(during.expect("the first certificate stays"), StatusCode::OK);
    assert_eq!(after, StatusCode::OK);
    assert!(
        old_trust.is_err(),
        "new connections no longer get the first certificate"
    );
    gateway.shutdown().await;
}

fn replace_file(path: &std::path::Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).expect("write");
    std::fs::rename(&staged, path).expect("rename");
}
