//! Connection bounds through real sockets: head and idle deadlines over HTTP/1 and h2, the connection
//! limit, and a gateway process whose open-files limit a flood of connections exceeds.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use integration_tests::{
    GatewayInstance, Tarpit, Upstream, body, free_plan, fresh_database, get, http_client,
    keyed_customer, send, spawn_billing_with_clock, spawn_gateway, spawn_gateway_at,
    spawn_ok_upstream, spawn_tarpit, spawn_upstream, spawn_usage,
};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

/// The head timeout of most gateways here: short, so the tests wait little.
const HEAD_TIMEOUT: Duration = Duration::from_millis(500);
/// How late past its deadline a connection may be closed on a loaded machine.
const MARGIN: Duration = Duration::from_secs(3);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface, an empty SETTINGS frame, then HEADERS for stream 1 (GET, http, /) without END_HEADERS:
/// the CONTINUATION that would finish the head never comes.
const PREFACE_AND_PARTIAL_HEADERS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
    \x00\x00\x00\x04\x00\x00\x00\x00\x00\
    \x00\x00\x03\x01\x01\x00\x00\x00\x01\x82\x86\x84";

/// A gateway whose backends hang: enough for `/_paygate/health`, which asks neither. The stand-ins must
/// live as long as the gateway.
async fn gateway_without_backends(limits: &str) -> (GatewayInstance, (Tarpit, Upstream)) {
    let tarpit = spawn_tarpit().await;
    let upstream = spawn_ok_upstream().await;
    let routes = format!(
        "[limits]\n{limits}\n\n[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gateway = spawn_gateway_at(tarpit.addr, tarpit.addr, &routes).await;
    (gateway, (tarpit, upstream))
}

/// Connects, sends `head` one byte per `pause`, and returns how long after connecting the gateway
/// closed the connection, or `None` if the whole head went out first.
async fn send_slowly(addr: SocketAddr, head: &'static [u8], pause: Duration) -> Option<Duration> {
    let connected = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        for byte in head {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
        // Kept open: the gateway, not the end of the head, must end the connection.
        std::future::pending::<()>().await;
    });
    let closed = tokio::time::timeout(
        pause * u32::try_from(head.len()).expect("short head"),
        read_until_closed(&mut reader),
    )
    .await;
    writing.abort();
    closed.ok().map(|()| connected.elapsed())
}

/// Reads and discards everything until the peer closes (or resets) the connection.
async fn read_until_closed(reader: &mut (impl AsyncReadExt + Unpin)) {
    let mut buffer = [0_u8; 4096];
    while let Ok(read) = reader.read(&mut buffer).await {
        if read == 0 {
            return;
        }
    }
}

/// Connects, sends `bytes` at once, and returns how long after connecting the gateway closed the
/// connection (at most `MARGIN` plus the head timeout is waited).
async fn send_and_time_close(addr: SocketAddr, bytes: &'static [u8]) -> Option<Duration> {
    let connected = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    tokio::time::timeout(HEAD_TIMEOUT + MARGIN, read_until_closed(&mut stream))
        .await
        .ok()
        .map(|()| connected.elapsed())
}

/// Asks for `/_paygate/health` (over h2 when `http2`, else HTTP/1.1) every 50 ms until stopped; returns the statuses seen (0 for
/// a failed request) and the slowest answer.
fn keep_asking_for_health(url: String, http2: bool) -> (JoinHandle<(Vec<u16>, Duration)>, Stop) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http::<Full<Bytes>>();
        let (mut statuses, mut slowest) = (Vec::new(), Duration::ZERO);
        while !*stopped.borrow() {
            let started = Instant::now();
            let status = match client.request(get(&url, &[])).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            };
            statuses.push(status);
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (statuses, slowest)
    });
    (task, Stop(stop))
}

struct Stop(tokio::sync::watch::Sender<bool>);

impl Stop {
    fn now(self) {
        let _ = self.0.send(true);
    }
}

fn assert_closed_by_head_timeout(closed: &[Option<Duration>]) {
    for (index, closed) in closed.iter().enumerate() {
        let closed = closed.unwrap_or_else(|| panic!("connection {index} was never closed"));
        assert!(
            closed >= HEAD_TIMEOUT - Duration::from_millis(50),
            "connection {index} closed after {closed:?}, before the head timeout"
        );
        assert!(
            closed <= HEAD_TIMEOUT + MARGIN,
            "connection {index} closed after {closed:?}"
        );
    }
}

fn assert_all_served(statuses: &[u16], slowest: Duration) {
    assert!(statuses.len() >= 3, "too few requests: {statuses:?}");
    assert!(statuses.iter().all(|&status| status == 200), "{statuses:?}");
    assert!(
        slowest <= Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
}

const SLOW_HEAD: &[u8] =
    b"GET /_paygate/health HTTP/1.1\r\nHost: gateway\r\nUser-Agent: one-byte-at-a-time\r\nAccept: */*\r\n\r\n";

#[tokio::test]
async fn silent_and_trickling_http1_connections_are_closed_at_the_head_timeout_while_others_are_served()
 {
    let (gateway, _stand_ins) = gateway_without_backends("header_read_timeout_ms = 500").await;
    let (normal, stop) = keep_asking_for_health(gateway.url("/_paygate/health"), false);

    let silent = (0..20).map(|_| send_and_time_close(gateway.addr, b""));
    let trickling =
        (0..20).map(|_| send_slowly(gateway.addr, SLOW_HEAD, Duration::from_millis(100)));
    let (silent, trickling) = tokio::join!(run_all(silent), run_all(trickling));
    stop.now();
    let (statuses, slowest) = normal.await.expect("normal client");

    assert_closed_by_head_timeout(&silent);
    assert_closed_by_head_timeout(&trickling);
    assert_all_served(&statuses, slowest);
}

#[tokio::test]
async fn h2_connections_without_a_whole_first_request_are_closed_at_the_head_timeout_while_others_are_served()
 {
    let (gateway, _stand_ins) = gateway_without_backends("header_read_timeout_ms = 500").await;
    let (normal, stop) = keep_asking_for_health(gateway.url("/_paygate/health"), true);

    let (part_of_preface, whole_preface, partial_headers, trickled_preface) = tokio::join!(
        send_and_time_close(gateway.addr, &H2_PREFACE[..10]),
        send_and_time_close(gateway.addr, H2_PREFACE),
        send_and_time_close(gateway.addr, PREFACE_AND_PARTIAL_HEADERS),
        send_slowly(gateway.addr, H2_PREFACE, Duration::from_millis(100)),
    );
    stop.now();
    let (statuses, slowest) = normal.await.expect("normal client");

    assert_closed_by_head_timeout(&[
        part_of_preface,
        whole_preface,
        partial_headers,
        trickled_preface,
    ]);
    assert_all_served(&statuses, slowest);
}

/// Sends one request for `/_paygate/health` on `stream` and reads its whole answer.
async fn ask_for_health(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /_paygate/health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0_u8; 1024];
    // The health answer is `ok\n` with a length, so it ends with that body.
    while !answer.ends_with(b"\r\n\r\nok\n") {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(read > 0, "closed mid-answer: {answer:?}");
        answer.extend_from_slice(&buffer[..read]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn the_next_head_on_a_kept_alive_connection_is_due_within_the_head_timeout_of_its_first_byte()
{
    let (gateway, _stand_ins) = gateway_without_backends("header_read_timeout_ms = 500").await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    ask_for_health(&mut stream).await;

    let started = Instant::now();
    stream.write_all(b"GET /_pay").await.expect("write");
    let closed = tokio::time::timeout(HEAD_TIMEOUT + MARGIN, read_until_closed(&mut stream)).await;

    assert!(closed.is_ok(), "the unfinished head was never cut");
    assert!(started.elapsed() >= HEAD_TIMEOUT - Duration::from_millis(50));
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout_not_the_head_timeout() {
    let idle = Duration::from_millis(1500);
    let (gateway, _stand_ins) =
        gateway_without_backends("header_read_timeout_ms = 200\nidle_timeout_ms = 1500").await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    ask_for_health(&mut stream).await;

    let answered = Instant::now();
    let closed = tokio::time::timeout(idle + MARGIN, read_until_closed(&mut stream)).await;
    let idle_for = answered.elapsed();

    assert!(closed.is_ok(), "the idle connection was never closed");
    assert!(
        idle_for >= idle - Duration::from_millis(100),
        "closed after {idle_for:?} idle"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once_and_served_again_once_others_close() {
    let (gateway, _stand_ins) = gateway_without_backends("max_connections = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
        ask_for_health(&mut stream).await;
        held.push(stream);
    }

    let started = Instant::now();
    let mut fourth = TcpStream::connect(gateway.addr).await.expect("connect");
    let refused = tokio::time::timeout(MARGIN, read_until_closed(&mut fourth)).await;
    let refused_after = started.elapsed();
    let mut probe = [0_u8; 1];
    let held_open = held
        .iter()
        .all(|stream| matches!(stream.try_read(&mut probe), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock));
    drop(held);
    let served_again = poll_health(&gateway.url("/_paygate/health"), MARGIN).await;

    assert!(refused.is_ok(), "the connection over the limit stayed open");
    assert!(refused_after <= Duration::from_secs(1), "{refused_after:?}");
    assert!(held_open, "a connection within the limit was closed");
    assert!(
        served_again,
        "no request was served after the others closed"
    );
}

/// Asks for health on fresh connections until one answers 200 or `within` passes.
async fn poll_health(url: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        // A new client each time, so no refused connection is reused from a pool.
        if let Ok(response) = http_client().request(get(url, &[])).await
            && response.status() == StatusCode::OK
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Billing with its clock at the real now, so entitlements' lifetimes are in the future.
async fn billing_now() -> integration_tests::BillingInstance {
    let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
    spawn_billing_with_clock(fresh_database().await, clock).await
}

#[tokio::test]
async fn a_request_waiting_for_its_upstream_or_sending_its_body_slowly_is_not_cut_by_the_timeouts()
{
    let billing = billing_now().await;
    let usage = spawn_usage(&billing).await;
    let upstream = spawn_upstream(|request| async move {
        let wait = request.uri().path() == "/v1/slow";
        let received = request
            .into_body()
            .collect()
            .await
            .expect("a whole body")
            .to_bytes();
        if wait {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        Response::new(body(format!("received {}", received.len())))
    })
    .await;
    let routes = format!(
        "[limits]\nheader_read_timeout_ms = 300\nidle_timeout_ms = 300\n\n[[routes]]\nprefix = \"/v1\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gateway = spawn_gateway(&billing, &usage, &routes).await;
    let customer = keyed_customer(&billing, Some(free_plan(10))).await;

    let waited = send(
        &http_client(),
        get(
            &gateway.url("/v1/slow"),
            &[("x-api-key", customer.secret.as_str())],
        ),
    )
    .await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream
        .write_all(
            format!(
                "POST /v1/upload HTTP/1.1\r\nHost: gateway\r\nX-API-Key: {}\r\nContent-Length: 8\r\nConnection: close\r\n\r\n",
                customer.secret
            )
            .as_bytes(),
        )
        .await
        .expect("write the head");
    for byte in b"12345678" {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.write_all(&[*byte]).await.expect("write the body");
    }
    let mut uploaded = String::new();
    stream
        .read_to_string(&mut uploaded)
        .await
        .expect("read the answer");

    assert_eq!(waited.status, StatusCode::OK);
    assert_eq!(waited.body, "received 0");
    assert!(uploaded.starts_with("HTTP/1.1 200"), "{uploaded}");
    assert!(uploaded.ends_with("received 8"), "{uploaded}");
}

/// Runs every future as its own task and returns their outputs in order.
async fn run_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.expect("task"));
    }
    outputs
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Builds the `gateway` binary into this build's target directory and returns its path.
async fn gateway_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = tokio::process::Command::new(&cargo)
        .current_dir(&root)
        // The same packages as the walkthrough test builds, so the two share one set of artifacts instead
        // of each compiling the dependencies with its own feature set.
        .args([
            "build",
            "--locked",
            "-p",
            "billing",
            "-p",
            "usage",
            "-p",
            "gateway",
            "-p",
            "paygatectl",
            "--bins",
        ])
        .arg("--target-dir")
        .arg(&target)
        .status()
        .await
        .expect("cargo runs");
    assert!(built.success(), "building the gateway failed");
    target.join("debug").join("gateway")
}

#[tokio::test]
async fn a_gateway_flooded_past_its_open_files_limit_serves_again_afterwards_and_logs_little() {
    let binary = gateway_binary().await;
    let dir = std::env::temp_dir().join(format!(
        "paygate-connections-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // A limit far above the open-files limit, so the flood meets `Too many open files` on accept.
    std::fs::write(
        dir.join("routes.toml"),
        "[limits]\nmax_connections = 5000\nheader_read_timeout_ms = 60000\n\n[[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .expect("routes file");
    let log_path = dir.join("gateway.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let port = free_port();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let _gateway = tokio::process::Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\""])
        .arg(&binary)
        .env("GATEWAY_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("GATEWAY_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("GATEWAY_CONFIG", dir.join("routes.toml"))
        .env("BILLING_URL", &nowhere)
        .env("USAGE_URL", &nowhere)
        .env("PAYGATE_SERVICE_TOKEN", "connections-test-service-token")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("sh starts the gateway");
    let health = format!("http://127.0.0.1:{port}/_paygate/health");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    assert!(
        poll_health(&health, Duration::from_secs(30)).await,
        "the gateway did not start: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let ran_out = poll_log(&log_path, "Too many open files", Duration::from_secs(10)).await;
    // The flood lasts a while: long enough for a spinning accept loop to write a million lines.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(flood);
    let served_again = poll_health(&health, Duration::from_secs(10)).await;
    let lines = std::fs::read_to_string(&log_path).expect("log");

    assert!(ran_out, "the gateway never ran out of files:\n{lines}");
    assert!(served_again, "not served after the flood:\n{lines}");
    assert!(
        lines.lines().count() < 50,
        "{} log lines:\n{lines}",
        lines.lines().count()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until the file at `path` contains `text`, for at most `within`.
async fn poll_log(path: &Path, text: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|log| log.contains(text)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
