//! The service binaries at start, run as child processes: a bad setting ends the process with a non-zero
//! exit and one line on stderr that names the variable and gives the cause once; and, once started, every
//! metric has HELP text, `LOG_FORMAT=json` logs JSON lines, text logs to a file carry no colour, and SIGHUP
//! reloads the gateway's routes file.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use integration_tests::{
    empty_database_url, get, http_client, redis_url, spawn_ok_upstream, unique_prefix,
};
use tokio::{process::Command, sync::OnceCell};

const ADMIN: &str = "startup-test-admin-token";
const SERVICE: &str = "startup-test-service-token";
const PLACEHOLDER: &str = "change-me-service-token-0123456789";

/// Builds the service binaries into this build's target directory once per test process; returns the
/// directory holding them.
async fn binaries() -> &'static Path {
    static DIR: OnceCell<PathBuf> = OnceCell::const_new();
    DIR.get_or_init(|| async {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The same packages as the walkthrough and connections tests build, so all share one set of
        // artifacts.
        let built = Command::new(&cargo)
            .current_dir(&root)
            .args([
                "build", "--locked", "-p", "billing", "-p", "usage", "-p", "gateway",
            ])
            .args(["-p", "paygatectl", "--bins", "--target-dir"])
            .arg(&target)
            .status()
            .await
            .expect("cargo runs");
        assert!(built.success(), "building the service binaries failed");
        target.join("debug")
    })
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "paygate-startup-{}-{name}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// How a refused start ended.
#[derive(Debug)]
struct Refusal {
    binary: &'static str,
    exit: Option<i32>,
    stderr: String,
}

/// Runs `binary` with only `env` (plus ports on loopback) and waits for it to exit (at most 30 s).
async fn refused_start(binary: &'static str, env: &[(&str, &str)]) -> Refusal {
    let mut command = Command::new(binaries().await.join(binary));
    command
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let prefix = binary.to_uppercase();
    command
        .env(format!("{prefix}_LISTEN_ADDR"), loopback(free_port()))
        .env(format!("{prefix}_METRICS_ADDR"), loopback(free_port()));
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("{binary} {env:?} kept running instead of refusing to start"))
        .expect("the binary runs");
    Refusal {
        binary,
        exit: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Asserts a non-zero exit with one line on stderr that names `variable` and contains `cause` once.
fn assert_refused(refusal: &Refusal, variable: &str, cause: &str) {
    let line = refusal.stderr.trim_end();
    assert!(
        matches!(refusal.exit, Some(code) if code != 0),
        "{refusal:?}"
    );
    assert_eq!(line.lines().count(), 1, "{refusal:?}");
    assert!(
        line.starts_with(&format!("{}: ", refusal.binary)),
        "{refusal:?}"
    );
    assert!(line.contains(variable), "no `{variable}`: {refusal:?}");
    assert_eq!(
        line.matches(cause).count(),
        1,
        "`{cause}` not once: {refusal:?}"
    );
}

fn routes_file(upstream: std::net::SocketAddr, prefixes: &[&str]) -> String {
    prefixes
        .iter()
        .map(|prefix| {
            format!("[[routes]]\nprefix = \"{prefix}\"\nupstream = \"http://{upstream}\"\n")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn every_service_refuses_short_equal_and_placeholder_tokens_in_one_line() {
    let routes = temp_path("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .expect("routes file");
    let routes = routes.to_str().expect("utf-8 path");
    let database = "postgres://paygate@127.0.0.1:9/paygate";
    let redis = "redis://127.0.0.1:9";

    let refusals = in_turn(vec![
        refused_start(
            "gateway",
            &[
                ("GATEWAY_CONFIG", routes),
                ("PAYGATE_SERVICE_TOKEN", "short-token"),
            ],
        ),
        refused_start(
            "gateway",
            &[
                ("GATEWAY_CONFIG", routes),
                ("PAYGATE_SERVICE_TOKEN", PLACEHOLDER),
            ],
        ),
        refused_start(
            "usage",
            &[
                ("REDIS_URL", redis),
                ("PAYGATE_SERVICE_TOKEN", "short-token"),
            ],
        ),
        refused_start(
            "usage",
            &[("REDIS_URL", redis), ("PAYGATE_SERVICE_TOKEN", PLACEHOLDER)],
        ),
        refused_start(
            "billing",
            &[
                ("DATABASE_URL", database),
                ("BILLING_ADMIN_TOKEN", "short-admin"),
                ("PAYGATE_SERVICE_TOKEN", SERVICE),
            ],
        ),
        refused_start(
            "billing",
            &[
                ("DATABASE_URL", database),
                ("BILLING_ADMIN_TOKEN", "change-me-admin-token-0123456789"),
                ("PAYGATE_SERVICE_TOKEN", SERVICE),
            ],
        ),
        refused_start(
            "billing",
            &[
                ("DATABASE_URL", database),
                ("BILLING_ADMIN_TOKEN", SERVICE),
                ("PAYGATE_SERVICE_TOKEN", SERVICE),
            ],
        ),
    ])
    .await;

    assert_refused(
        &refusals[0],
        "PAYGATE_SERVICE_TOKEN",
        "at least 16 characters",
    );
    assert_refused(&refusals[1], "PAYGATE_SERVICE_TOKEN", "placeholder");
    assert_refused(
        &refusals[2],
        "PAYGATE_SERVICE_TOKEN",
        "at least 16 characters",
    );
    assert_refused(&refusals[3], "PAYGATE_SERVICE_TOKEN", "placeholder");
    assert_refused(
        &refusals[4],
        "BILLING_ADMIN_TOKEN",
        "at least 16 characters",
    );
    assert_refused(&refusals[5], "BILLING_ADMIN_TOKEN", "placeholder");
    assert_refused(
        &refusals[6],
        "BILLING_ADMIN_TOKEN and PAYGATE_SERVICE_TOKEN",
        "must differ",
    );
}

#[tokio::test]
async fn a_bad_setting_is_one_line_naming_the_variable_with_its_cause_once() {
    let broken_routes = temp_path("broken.toml");
    std::fs::write(&broken_routes, "[[routes]\nprefix = \"/v1\"\n").expect("routes file");
    let broken_routes = broken_routes.to_str().expect("utf-8 path");
    let good_routes = temp_path("good.toml");
    std::fs::write(
        &good_routes,
        "[[routes]]\nprefix = \"/v1\"\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .expect("routes file");
    let good_routes = good_routes.to_str().expect("utf-8 path");
    let nothing_listens = format!("127.0.0.1:{}", free_port());
    let database = format!("postgres://paygate@{nothing_listens}/paygate");
    let redis = format!("redis://{nothing_listens}");
    let gateway_token = ("PAYGATE_SERVICE_TOKEN", SERVICE);

    let refusals = in_turn(vec![
        refused_start("gateway", &[gateway_token]),
        refused_start(
            "gateway",
            &[gateway_token, ("GATEWAY_CONFIG", broken_routes)],
        ),
        refused_start(
            "gateway",
            &[
                gateway_token,
                ("GATEWAY_CONFIG", broken_routes),
                ("LOG_FORMAT", "xml"),
            ],
        ),
        refused_start(
            "gateway",
            &[
                gateway_token,
                ("GATEWAY_CONFIG", good_routes),
                ("BILLING_URL", "not a url"),
            ],
        ),
        refused_start("usage", &[gateway_token, ("REDIS_URL", &redis)]),
        refused_start(
            "billing",
            &[
                ("DATABASE_URL", &database),
                ("BILLING_ADMIN_TOKEN", ADMIN),
                ("PAYGATE_SERVICE_TOKEN", SERVICE),
            ],
        ),
    ])
    .await;

    assert_refused(&refusals[0], "GATEWAY_CONFIG", "required");
    assert_refused(&refusals[1], "GATEWAY_CONFIG", "not valid TOML at line 1");
    assert_refused(&refusals[2], "LOG_FORMAT", "`xml`");
    assert_refused(&refusals[3], "BILLING_URL", "not a valid URL");
    assert_refused(&refusals[4], "REDIS_URL", "refused");
    assert_refused(&refusals[5], "DATABASE_URL", "refused");
}

/// Awaits `starts` one after the other (each refusal takes well under a second) and returns their
/// outcomes in order.
async fn in_turn<F: std::future::Future>(starts: Vec<F>) -> Vec<F::Output> {
    let mut outcomes = Vec::new();
    for start in starts {
        outcomes.push(start.await);
    }
    outcomes
}

/// A service binary running as a child process, its stdout going to a file.
struct Running {
    _child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

fn start(binary: &Path, env: &[(&str, String)], log: PathBuf) -> Running {
    let file = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new(binary);
    command
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command.spawn().expect("the binary starts");
    Running {
        pid: child.id().expect("a running child has a pid"),
        _child: child,
        log,
    }
}

async fn fetch(url: &str) -> Option<(u16, String)> {
    let answer = tokio::time::timeout(Duration::from_secs(5), http_client().request(get(url, &[])))
        .await
        .ok()?
        .ok()?;
    let status = answer.status().as_u16();
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Asks `url` every 100 ms until it answers `status` or `within` passes; returns whether it did.
async fn answers(url: &str, status: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if fetch(url).await.is_some_and(|(got, _)| got == status) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Returns the metric names of `# TYPE` lines and of `# HELP` lines.
fn typed_and_helped(exposition: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let names = |tag: &str| {
        exposition
            .lines()
            .filter_map(|line| line.strip_prefix(tag))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect::<BTreeSet<_>>()
    };
    (names("# TYPE "), names("# HELP "))
}

#[tokio::test]
async fn started_services_describe_every_metric_log_as_asked_and_the_gateway_reloads_routes_on_sighup()
 {
    let dir = binaries().await;
    let upstream = spawn_ok_upstream().await;
    let routes = temp_path("routes.toml");
    std::fs::write(&routes, routes_file(upstream.addr, &["/v1"])).expect("routes file");
    let (billing_port, usage_port) = (free_port(), free_port());
    let metrics: Vec<(&str, u16)> = vec![
        ("billing", free_port()),
        ("usage", free_port()),
        ("gateway", free_port()),
    ];
    let gateway_port = free_port();
    let token = ("PAYGATE_SERVICE_TOKEN", SERVICE.to_owned());
    let billing = start(
        &dir.join("billing"),
        &[
            ("DATABASE_URL", empty_database_url().await),
            ("BILLING_ADMIN_TOKEN", ADMIN.to_owned()),
            token.clone(),
            ("BILLING_LISTEN_ADDR", loopback(billing_port)),
            ("BILLING_METRICS_ADDR", loopback(metrics[0].1)),
        ],
        temp_path("billing.log"),
    );
    let _usage = start(
        &dir.join("usage"),
        &[
            ("REDIS_URL", redis_url().await),
            ("USAGE_KEY_PREFIX", unique_prefix()),
            ("BILLING_URL", format!("http://{}", loopback(billing_port))),
            token.clone(),
            ("USAGE_LISTEN_ADDR", loopback(usage_port)),
            ("USAGE_METRICS_ADDR", loopback(metrics[1].1)),
        ],
        temp_path("usage.log"),
    );
    let gateway = start(
        &dir.join("gateway"),
        &[
            ("GATEWAY_CONFIG", routes.display().to_string()),
            ("BILLING_URL", format!("http://{}", loopback(billing_port))),
            ("USAGE_URL", format!("http://{}", loopback(usage_port))),
            token,
            ("GATEWAY_LISTEN_ADDR", loopback(gateway_port)),
            ("GATEWAY_METRICS_ADDR", loopback(metrics[2].1)),
            ("LOG_FORMAT", "json".to_owned()),
        ],
        temp_path("gateway.log"),
    );
    let base = format!("http://{}", loopback(gateway_port));
    let ready = answers(
        &format!("{base}/_paygate/ready"),
        200,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        ready,
        "the stack did not become ready: {:?}; gateway log:\n{}",
        fetch(&format!("{base}/_paygate/ready")).await,
        std::fs::read_to_string(&gateway.log).unwrap_or_default()
    );
    let before_reload = fetch(&format!("{base}/v2/items")).await;

    std::fs::write(&routes, routes_file(upstream.addr, &["/v1", "/v2"])).expect("routes file");
    let signalled = Command::new("kill")
        .args(["-HUP", &gateway.pid.to_string()])
        .status()
        .await
        .expect("kill runs");
    let reloaded = answers(&format!("{base}/v2/items"), 401, Duration::from_secs(3)).await;
    let mut scrapes = Vec::new();
    for (service, port) in &metrics {
        let scrape = fetch(&format!("http://{}/metrics", loopback(*port))).await;
        scrapes.push((*service, scrape.map(|(_, body)| body).unwrap_or_default()));
    }
    let gateway_log = std::fs::read_to_string(&gateway.log).expect("gateway log");
    let billing_log = std::fs::read_to_string(&billing.log).expect("billing log");

    assert_eq!(before_reload.map(|(status, _)| status), Some(404));
    assert!(signalled.success());
    assert!(reloaded, "SIGHUP did not reload the routes:\n{gateway_log}");
    for (service, exposition) in &scrapes {
        let (typed, helped) = typed_and_helped(exposition);
        assert!(
            !typed.is_empty(),
            "{service} exposes no metrics:\n{exposition}"
        );
        let undescribed: Vec<_> = typed.difference(&helped).collect();
        assert!(
            undescribed.is_empty(),
            "{service}: no HELP for {undescribed:?}"
        );
    }
    for line in gateway_log.lines().filter(|line| !line.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
    }
    assert!(
        gateway_log.contains("routes file reloaded"),
        "{gateway_log}"
    );
    assert!(!billing_log.is_empty());
    assert!(
        !billing_log.contains('\u{1b}'),
        "colour in a log file:\n{billing_log}"
    );
    let _ = std::fs::remove_file(routes);
}
