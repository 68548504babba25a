//! The gateway in-process on port 0, a scriptable upstream HTTP server, and a small HTTP client.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{BillingInstance, SERVICE_TOKEN, UsageInstance};

/// Body of the upstream's answers.
pub type UpstreamBody = BoxBody<Bytes, Infallible>;

/// Returns a body holding `bytes`.
pub fn body(bytes: impl Into<Bytes>) -> UpstreamBody {
    Full::new(bytes.into()).boxed()
}

/// An HTTP server standing in for the API behind the gateway. It counts requests and keeps each one's
/// headers, then answers as the test's handler says.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    _task: JoinHandle<()>,
}

impl Upstream {
    /// Returns how many requests reached it.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Returns the headers of every request that reached it, in arrival order.
    pub fn seen(&self) -> Vec<HeaderMap> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Starts an upstream answering with `handler`.
pub async fn spawn_upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind the upstream");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let (task_hits, task_seen) = (hits.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (hits, seen, handler) = (task_hits.clone(), task_seen.clone(), handler.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    seen.lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(request.headers().clone());
                    let answer = handler(request);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        hits,
        seen,
        _task: task,
    }
}

/// Starts an upstream that answers every request `200 OK` with body `ok`.
pub async fn spawn_ok_upstream() -> Upstream {
    spawn_upstream(|_| async { Response::new(body("ok")) }).await
}

/// A gateway running in this process.
pub struct GatewayInstance {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

/// How long the test gateways wait for billing or usage: generous, because debug builds on a busy 2-core
/// machine serve thousands of concurrent admissions slowly, and a missed deadline is a 503.
pub const TEST_BACKEND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// Starts a gateway on a free port with `routes` (a routes file's TOML), asking `billing` and `usage`.
pub async fn spawn_gateway(
    billing: &BillingInstance,
    usage: &UsageInstance,
    routes: &str,
) -> GatewayInstance {
    spawn_gateway_at(billing.addr, usage.addr, routes).await
}

/// Starts a gateway asking billing and usage at the given addresses (which may be anything, such as a
/// listener that never answers), with leases on (the default).
pub async fn spawn_gateway_at(
    billing: SocketAddr,
    usage: SocketAddr,
    routes: &str,
) -> GatewayInstance {
    spawn_gateway_leasing(billing, usage, routes, gateway::config::Leases::On).await
}

/// Starts a gateway like [`spawn_gateway_at`], with leases `on` or off (`GATEWAY_LEASES`).
pub async fn spawn_gateway_leasing(
    billing: SocketAddr,
    usage: SocketAddr,
    routes: &str,
    leases: gateway::config::Leases,
) -> GatewayInstance {
    let (file, table) = gateway::routes::parse_routes_file(routes)
        .unwrap_or_else(|error| panic!("bad routes: {error}"));
    let token = proto::auth::BearerToken::new(SERVICE_TOKEN).expect("a valid token");
    let backends = gateway::backends::Backends::new(
        gateway::backends::channel(&format!("http://{billing}")).expect("billing URL"),
        gateway::backends::channel(&format!("http://{usage}")).expect("usage URL"),
        token,
        TEST_BACKEND_DEADLINE,
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind the gateway");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let gateway = gateway::gateway(file, table, backends, TEST_STATS_INTERVAL, leases);
    let serve = gateway::serve(listener, gateway, shutdown);
    let task = tokio::spawn(async move { serve.await.map_err(|error| format!("{error:#}")) });
    GatewayInstance { addr, stop, task }
}

impl GatewayInstance {
    /// Stops the gateway, waits for in-flight requests, and panics if it failed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("gateway failed: {error}"),
            Err(error) => panic!("gateway task failed: {error}"),
        }
    }

    /// Returns `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A plain HTTP/1.1 client for tests.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A whole answer: status, headers and collected body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// Parses the body as JSON; panics when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {:?}", self.body))
    }
}

/// How often in-process gateways report customer statistics: often, so tests wait little.
pub const TEST_STATS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Sends `request` and collects the answer.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Answer {
    let response = client.request(request).await.expect("the gateway answers");
    let (parts, incoming) = response.into_parts();
    let body = incoming.collect().await.expect("a whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Returns a GET of `url` with the given headers.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::get(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

/// A TCP listener that accepts connections and never answers on them: a backend that hangs.
pub struct Tarpit {
    pub addr: SocketAddr,
    _task: JoinHandle<()>,
}

/// Starts a tarpit on a free port.
pub async fn spawn_tarpit() -> Tarpit {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind the tarpit");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    Tarpit { addr, _task: task }
}
