//! The side-by-side benchmark (run it with `bench/run`): paygate's gateway, usage and billing as separate
//! release processes against real PostgreSQL and Redis, next to nginx as a plain reverse proxy to the same
//! upstream (nginx answering `200 ok` itself), all on this machine's cores. Load comes from `wrk` (closed
//! loop, saturation) and `oha` (open loop at a fixed rate, corrected for coordinated omission; and the
//! exactness bursts). It prints one table with the ratios the targets are stated in and writes the figures
//! as JSON. Every figure is the median of its repeats.

#![allow(clippy::print_stdout)] // printing figures is this program's job

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Instant,
};

use clap::Parser;
use integration_tests::bench::{
    KEYS_PER_CUSTOMER, Process, START_ATTEMPTS, admin_client, billing_spec, free_port,
    gateway_spec, key_with_quota, many_keys, units_used, usage_client, usage_spec,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// What to run, and how big.
#[derive(Parser)]
#[command(about = "paygate side by side with a plain nginx proxy (see bench/README.md)")]
struct Args {
    /// Directory holding the `billing`, `usage` and `gateway` binaries.
    #[arg(long)]
    bin_dir: PathBuf,
    /// Directory the JSON results are written to.
    #[arg(long, default_value = "bench/results")]
    results: PathBuf,
    /// Seconds of load per saturation figure.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Seconds of load per latency figure.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// How often each figure is measured (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Open-loop request rate for the latency figures.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Connections for the saturation figures.
    #[arg(long, default_value_t = 64)]
    connections: u64,
    /// Distinct keys for the many-keys figures.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Units each burst customer may use.
    #[arg(long, default_value_t = 10_000)]
    burst_quota: i64,
    /// Requests per burst.
    #[arg(long, default_value_t = 50_000)]
    burst_requests: u64,
    /// Connections per burst.
    #[arg(long, default_value_t = 256)]
    burst_connections: u64,
    /// Bursts (each with a customer of its own).
    #[arg(long, default_value_t = 10)]
    burst_trials: usize,
    /// Tokio worker threads for billing, usage and the gateway (`TOKIO_WORKER_THREADS`); unset: one per core.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// The gateway's deadline for billing and usage calls, in ms (`GATEWAY_BACKEND_DEADLINE_MS`; default
    /// 250, the gateway's). The smoke run on the debug build raises it: a slow debug build must not turn
    /// into 503s, which the benchmark treats as failures.
    #[arg(long, default_value_t = 250)]
    backend_deadline_ms: u64,
    /// A label for the results file (e.g. `smoke`).
    #[arg(long, default_value = "full")]
    label: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let work = integration_tests::bench::work_dir("paygate-bench");
    let report = run(&args, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let file = integration_tests::bench::write_results(&args.results, &args.label, &report);
    println!("\nfigures written to {}", file.display());
    if report["burst"]["exact_trials"] != report["burst"]["trials"] {
        eprintln!("paygate-bench: a burst admitted a number other than its quota");
        std::process::exit(1);
    }
}

async fn run(args: &Args, work: &Path) -> Value {
    let ticks = clock_ticks_per_second();
    println!("starting PostgreSQL, Redis, nginx, billing, usage and the gateway…");
    let database_url = integration_tests::empty_database_url().await;
    let redis_url = integration_tests::redis_url().await;
    let redis_pid = redis_pid(&redis_url).await;

    let nginx = start_nginx(work).await;
    let (upstream_port, nginx_port) = (nginx.upstream_port, nginx.proxy_port);

    let billing = billing_spec(&args.bin_dir, &database_url)
        .worker_threads(args.worker_threads)
        .start()
        .await;
    let billing_port = billing.port;
    let usage = usage_spec(&args.bin_dir, &redis_url, billing_port)
        .worker_threads(args.worker_threads)
        .start()
        .await;
    let usage_port = usage.port;
    let gateway_spec = gateway_spec(
        &args.bin_dir,
        work,
        &format!("127.0.0.1:{upstream_port}"),
        args.backend_deadline_ms,
        billing_port,
        usage_port,
    )
    .worker_threads(args.worker_threads);
    let mut gateway = gateway_spec.start().await;

    println!("creating customers and keys…");
    let admin = admin_client(billing_port).await;
    let single = key_with_quota(&admin, "bench-unlimited", 1_000_000_000_000)
        .await
        .0;
    let refused = key_with_quota(&admin, "bench-nothing", 0).await.0;
    let started = Instant::now();
    let many = many_keys(&admin, args.keys).await;
    println!(
        "  {} keys of {} customers issued in {:.1} s",
        many.len(),
        args.keys.div_ceil(KEYS_PER_CUSTOMER),
        started.elapsed().as_secs_f64()
    );
    let keys_file = work.join("keys.txt");
    std::fs::write(&keys_file, many.join("\n") + "\n").expect("the keys file");
    let scripts = WrkScripts::write(work);

    let direct_url = format!("http://127.0.0.1:{upstream_port}/v1/bench");
    let nginx_url = format!("http://127.0.0.1:{nginx_port}/v1/bench");
    let mut gateway_url = format!("http://127.0.0.1:{}/v1/bench", gateway.port);
    let load = Load {
        connections: args.connections,
        scripts: &scripts,
    };

    println!("warming up…");
    for url in [&direct_url, &nginx_url, &gateway_url] {
        load.single(url, &single, 1).await;
    }
    load.single(&gateway_url, &refused, 1).await;

    println!(
        "saturation (closed loop, {} connections, {} s each, {} repeats)…",
        args.connections, args.seconds, args.repeats
    );
    let mut direct = Vec::new();
    let mut nginx = Vec::new();
    let mut admitted = Vec::new();
    let mut quota_402 = Vec::new();
    let mut cpu_per_admitted = Vec::new();
    let processes = [
        ("gateway", gateway.process.pid()),
        ("usage", usage.process.pid()),
        ("billing", billing.process.pid()),
        ("redis", redis_pid),
    ];
    for _ in 0..args.repeats {
        direct.push(
            load.single(&direct_url, &single, args.seconds)
                .await
                .expect_all_ok("direct"),
        );
        nginx.push(
            load.single(&nginx_url, &single, args.seconds)
                .await
                .expect_all_ok("nginx"),
        );
        let before = cpu_of(&processes, ticks);
        let run = load
            .single(&gateway_url, &single, args.seconds)
            .await
            .expect_all_ok("admitted");
        let after = cpu_of(&processes, ticks);
        cpu_per_admitted.push(CpuShare::between(&before, &after, run.requests));
        admitted.push(run);
        quota_402.push(
            load.single(&gateway_url, &refused, args.seconds)
                .await
                .expect_none_ok("402"),
        );
    }

    println!("{} distinct keys: a cold pass, then warm…", many.len());
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for repeat in 0..args.repeats {
        if repeat > 0 {
            // A fresh gateway process: its entitlement cache is empty again. Nothing else points at the
            // gateway, so it may come back on another port, which is picked like the first.
            drop(gateway);
            gateway = gateway_spec.start().await;
            gateway_url = format!("http://127.0.0.1:{}/v1/bench", gateway.port);
            load.single(&gateway_url, &single, 1).await;
        }
        cold.push(
            each_key_once(&gateway_url, &many, args.connections)
                .await
                .expect_all_ok("cold keys"),
        );
        warm.push(
            load.keys(&gateway_url, &keys_file, args.seconds)
                .await
                .expect_all_ok("warm keys"),
        );
    }
    let processes = [
        ("gateway", gateway.process.pid()),
        ("usage", usage.process.pid()),
        ("billing", billing.process.pid()),
        ("redis", redis_pid),
    ];

    println!(
        "latency (open loop at {} requests/s, {} s each)…",
        args.rate, args.latency_seconds
    );
    let mut latency_direct = Vec::new();
    let mut latency_nginx = Vec::new();
    let mut latency_gateway = Vec::new();
    let mut cpu_at_rate = Vec::new();
    for _ in 0..args.repeats {
        latency_direct
            .push(oha_at_rate(&direct_url, &single, args.rate, args.latency_seconds).await);
        latency_nginx.push(oha_at_rate(&nginx_url, &single, args.rate, args.latency_seconds).await);
        let before = cpu_of(&processes, ticks);
        let figures = oha_at_rate(&gateway_url, &single, args.rate, args.latency_seconds).await;
        let after = cpu_of(&processes, ticks);
        cpu_at_rate.push(CpuShare::between(&before, &after, figures.ok));
        latency_gateway.push(figures);
    }

    println!(
        "bursts: quota {}, {} requests on {} connections, {} trials…",
        args.burst_quota, args.burst_requests, args.burst_connections, args.burst_trials
    );
    let usage_client = usage_client(usage_port).await;
    let mut bursts = Vec::new();
    for trial in 0..args.burst_trials {
        let (key, subscription) =
            key_with_quota(&admin, &format!("bench-burst-{trial}"), args.burst_quota).await;
        let statuses = oha_burst(
            &gateway_url,
            &key,
            args.burst_requests,
            args.burst_connections,
        )
        .await;
        let counted = units_used(&usage_client, &subscription).await;
        bursts.push(json!({
            "admitted": statuses.get("200").copied().unwrap_or(0),
            "quota_exhausted": statuses.get("402").copied().unwrap_or(0),
            "statuses": statuses,
            "units_used_in_usage": counted,
        }));
    }
    drop(gateway);

    let report = Report {
        args,
        direct,
        nginx,
        admitted,
        quota_402,
        cold,
        warm,
        cpu_per_admitted,
        cpu_at_rate,
        latency_direct,
        latency_nginx,
        latency_gateway,
        bursts,
    };
    report.print();
    report.to_json()
}

// ----- processes -----

/// The nginx of the benchmark: the upstream (answering by itself) and the plain proxy in front of it.
struct Nginx {
    _process: Process,
    upstream_port: u16,
    proxy_port: u16,
}

/// Starts nginx on two free ports, retrying on others when one was taken before nginx bound it.
async fn start_nginx(work: &Path) -> Nginx {
    let mut last_error = None;
    for _ in 0..START_ATTEMPTS {
        let (upstream_port, proxy_port) = (free_port(), free_port());
        let mut process = spawn_nginx(work, upstream_port, proxy_port);
        let listening = match process.wait_until_listening(upstream_port).await {
            Ok(()) => process.wait_until_listening(proxy_port).await,
            Err(error) => Err(error),
        };
        match listening {
            Ok(()) => {
                return Nginx {
                    _process: process,
                    upstream_port,
                    proxy_port,
                };
            }
            Err(error) => last_error = Some(error),
        }
    }
    panic!(
        "nginx failed to start after {START_ATTEMPTS} attempts: {}",
        last_error.expect("an attempt")
    );
}

fn spawn_nginx(work: &Path, upstream_port: u16, proxy_port: u16) -> Process {
    let dir = work.join("nginx");
    std::fs::create_dir_all(&dir).expect("nginx's directory");
    // One nginx serves both: the upstream answers by itself, and the proxy is the stock reverse-proxy
    // setup with keep-alive to the upstream (what a plain nginx in front of an API looks like).
    let config = format!(
        r#"daemon off;
master_process on;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{upstream_port} reuseport;
        location / {{
            default_type text/plain;
            return 200 "ok\n";
        }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port} reuseport;
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        dir = dir.display()
    );
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config).expect("nginx.conf");
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&config_path);
    Process::spawn("nginx", command)
}

async fn redis_pid(url: &str) -> u32 {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("Redis reports its process id")
}

fn clock_ticks_per_second() -> f64 {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK is a number")
}

/// Returns the user + system CPU seconds each process has used so far.
fn cpu_of(processes: &[(&'static str, u32)], ticks: f64) -> Vec<(&'static str, f64)> {
    processes
        .iter()
        .map(|&(name, pid)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|error| panic!("failed to read {name}'s /proc stat: {error}"));
            // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields.
            let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let used: f64 = fields[11].parse::<f64>().expect("utime")
                + fields[12].parse::<f64>().expect("stime");
            (name, used / ticks)
        })
        .collect()
}

/// CPU per request, in µs, per process and in total.
#[derive(Clone)]
struct CpuShare {
    per_process: Vec<(&'static str, f64)>,
    total: f64,
}

impl CpuShare {
    fn between(
        before: &[(&'static str, f64)],
        after: &[(&'static str, f64)],
        requests: u64,
    ) -> Self {
        let per_process: Vec<(&'static str, f64)> = before
            .iter()
            .zip(after)
            .map(|(&(name, start), &(_, end))| (name, (end - start) * 1e6 / requests.max(1) as f64))
            .collect();
        let total = per_process.iter().map(|(_, micros)| micros).sum();
        Self { per_process, total }
    }
}

// ----- load -----

struct WrkScripts {
    summary: PathBuf,
    keys: PathBuf,
}

/// Prints wrk's summary in a form this program reads (wrk's own text output is for people).
const WRK_DONE: &str = r#"
function done(summary, latency, requests)
  io.write(string.format("BENCH %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
"#;

/// Each wrk thread takes every n-th key of the file (args: file, threads) and sends them in turn.
const WRK_KEYS: &str = r#"
local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("index", thread_count)
end

local requests = {}
local position = 0
function init(args)
  local index, threads = wrk.thread:get("index"), tonumber(args[2])
  local line_number = 0
  for line in io.lines(args[1]) do
    line_number = line_number + 1
    if line ~= "" and (line_number - 1) % threads == index - 1 then
      requests[#requests + 1] = wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. line })
    end
  end
end

function request()
  position = position % #requests + 1
  return requests[position]
end
"#;

impl WrkScripts {
    fn write(work: &Path) -> Self {
        let scripts = Self {
            summary: work.join("summary.lua"),
            keys: work.join("keys.lua"),
        };
        std::fs::write(&scripts.summary, WRK_DONE).expect("a wrk script");
        std::fs::write(&scripts.keys, format!("{WRK_KEYS}{WRK_DONE}")).expect("a wrk script");
        scripts
    }
}

const WRK_THREADS: u64 = 2;

/// A closed-loop run's outcome.
#[derive(Clone, Copy)]
struct Throughput {
    requests: u64,
    seconds: f64,
    not_ok: u64,
    socket_errors: u64,
}

impl Throughput {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn expect_all_ok(self, what: &str) -> Self {
        assert!(
            self.not_ok == 0 && self.socket_errors == 0,
            "{what}: {} answers were not 2xx and {} socket errors happened",
            self.not_ok,
            self.socket_errors
        );
        self
    }

    fn expect_none_ok(self, what: &str) -> Self {
        assert!(
            self.not_ok == self.requests && self.socket_errors == 0,
            "{what}: {} of {} answers were 2xx, {} socket errors",
            self.requests - self.not_ok,
            self.requests,
            self.socket_errors
        );
        self
    }
}

struct Load<'a> {
    connections: u64,
    scripts: &'a WrkScripts,
}

impl Load<'_> {
    async fn single(&self, url: &str, key: &str, seconds: u64) -> Throughput {
        let mut command = self.wrk(seconds.max(1));
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {key}"))
            .arg("-s")
            .arg(&self.scripts.summary)
            .arg(url);
        run_wrk(command).await
    }

    async fn keys(&self, url: &str, keys_file: &Path, seconds: u64) -> Throughput {
        let mut command = self.wrk(seconds.max(1));
        // wrk hands the URL and what follows it to the script's `init` (the URL as args[0]).
        command
            .arg("-s")
            .arg(&self.scripts.keys)
            .arg(url)
            .arg(keys_file)
            .arg(WRK_THREADS.to_string());
        run_wrk(command).await
    }

    fn wrk(&self, seconds: u64) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("wrk");
        command
            .arg(format!("-t{WRK_THREADS}"))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{seconds}s"))
            .arg("--timeout")
            .arg("10s");
        command
    }
}

async fn run_wrk(mut command: tokio::process::Command) -> Throughput {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|error| panic!("failed to run wrk (is it installed?): {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("BENCH "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no summary: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let numbers: Vec<u64> = line
        .split_whitespace()
        .map(|n| n.parse().expect("a count"))
        .collect();
    Throughput {
        requests: numbers[0],
        seconds: numbers[1] as f64 / 1e6,
        not_ok: numbers[2],
        socket_errors: numbers[3..].iter().sum(),
    }
}

/// Sends each key once, from `connections` connections, and times the whole pass. wrk cannot stop after
/// a number of requests (its threads can stop, but its clock runs for the whole duration), so this one
/// is paygate-bench's own client; the pass is bound by billing's resolves, not by the client.
async fn each_key_once(url: &str, keys: &[String], connections: u64) -> Throughput {
    let client = integration_tests::http_client();
    let keys: Arc<[String]> = keys.into();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        let (client, keys, next, url) =
            (client.clone(), keys.clone(), next.clone(), url.to_owned());
        workers.spawn(async move {
            let (mut sent, mut not_ok, mut failed) = (0_u64, 0_u64, 0_u64);
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(key) = keys.get(index) else {
                    return (sent, not_ok, failed);
                };
                let request = http::Request::get(&url)
                    .header("authorization", format!("Bearer {key}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("a valid request");
                sent += 1;
                match client.request(request).await {
                    Ok(answer) => {
                        not_ok += u64::from(!answer.status().is_success());
                        let _ = http_body_util::BodyExt::collect(answer.into_body()).await;
                    }
                    Err(_) => failed += 1,
                }
            }
        });
    }
    let mut total = Throughput {
        requests: 0,
        seconds: 0.0,
        not_ok: 0,
        socket_errors: 0,
    };
    while let Some(counts) = workers.join_next().await {
        let (sent, not_ok, failed) = counts.expect("a client task");
        total.requests += sent;
        total.not_ok += not_ok;
        total.socket_errors += failed;
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// Latency percentiles of an open-loop run, in µs, and how many answers were 2xx.
#[derive(Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    ok: u64,
    total: u64,
}

async fn run_oha(args: &[String]) -> Value {
    let output = tokio::process::Command::new("oha")
        .args(args)
        .args(["--no-tui", "--output-format", "json"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|error| panic!("failed to run oha (is it installed?): {error}"));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "oha printed no JSON ({error}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn status_counts(figures: &Value) -> BTreeMap<String, u64> {
    figures["statusCodeDistribution"]
        .as_object()
        .map(|statuses| {
            statuses
                .iter()
                .map(|(status, count)| (status.clone(), count.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

async fn oha_at_rate(url: &str, key: &str, rate: u64, seconds: u64) -> Latency {
    let figures = run_oha(&[
        "-z".into(),
        format!("{seconds}s"),
        "-q".into(),
        rate.to_string(),
        "--latency-correction".into(),
        "-c".into(),
        "64".into(),
        "-H".into(),
        format!("Authorization: Bearer {key}"),
        url.into(),
    ])
    .await;
    let statuses = status_counts(&figures);
    let percentile = |name: &str| {
        figures["latencyPercentiles"][name]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1e6
    };
    Latency {
        p50: percentile("p50"),
        p99: percentile("p99"),
        p999: percentile("p99.9"),
        ok: statuses.get("200").copied().unwrap_or(0),
        total: statuses.values().sum(),
    }
}

async fn oha_burst(url: &str, key: &str, requests: u64, connections: u64) -> BTreeMap<String, u64> {
    let figures = run_oha(&[
        "-n".into(),
        requests.to_string(),
        "-c".into(),
        connections.to_string(),
        "-H".into(),
        format!("Authorization: Bearer {key}"),
        url.into(),
    ])
    .await;
    status_counts(&figures)
}

// ----- the report -----

struct Report<'a> {
    args: &'a Args,
    direct: Vec<Throughput>,
    nginx: Vec<Throughput>,
    admitted: Vec<Throughput>,
    quota_402: Vec<Throughput>,
    cold: Vec<Throughput>,
    warm: Vec<Throughput>,
    cpu_per_admitted: Vec<CpuShare>,
    cpu_at_rate: Vec<CpuShare>,
    latency_direct: Vec<Latency>,
    latency_nginx: Vec<Latency>,
    latency_gateway: Vec<Latency>,
    bursts: Vec<Value>,
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn rps(runs: &[Throughput]) -> f64 {
    median(runs.iter().map(Throughput::per_second))
}

fn latency_median(runs: &[Latency], pick: fn(&Latency) -> f64) -> f64 {
    median(runs.iter().map(pick))
}

fn cpu_median(shares: &[CpuShare]) -> Value {
    let Some(first) = shares.first() else {
        return Value::Null;
    };
    let mut per_process = serde_json::Map::new();
    for (index, (name, _)) in first.per_process.iter().enumerate() {
        per_process.insert(
            (*name).into(),
            json!(median(
                shares.iter().map(|share| share.per_process[index].1)
            )),
        );
    }
    json!({ "total_us": median(shares.iter().map(|share| share.total)), "per_process_us": per_process })
}

struct Target {
    name: &'static str,
    measured: String,
    goal: String,
    met: bool,
}

impl Report<'_> {
    fn targets(&self) -> Vec<Target> {
        let nginx = rps(&self.nginx);
        let admitted = rps(&self.admitted);
        let refused = rps(&self.quota_402);
        let warm = rps(&self.warm);
        let added_p50 = latency_median(&self.latency_gateway, |l| l.p50)
            - latency_median(&self.latency_direct, |l| l.p50);
        let added_p99 = latency_median(&self.latency_gateway, |l| l.p99)
            - latency_median(&self.latency_direct, |l| l.p99);
        let cpu = median(self.cpu_per_admitted.iter().map(|share| share.total));
        let cpu_at_rate = median(self.cpu_at_rate.iter().map(|share| share.total));
        let exact = self
            .bursts
            .iter()
            .filter(|burst| self.burst_exact(burst))
            .count();
        vec![
            Target {
                name: "admitted ÷ nginx plain proxy",
                measured: format!("{:.2}", admitted / nginx),
                goal: "≥ 0.50".into(),
                met: admitted / nginx >= 0.5,
            },
            Target {
                name: "402 path ÷ admitted",
                measured: format!("{:.2}", refused / admitted),
                goal: "≥ 1.50".into(),
                met: refused / admitted >= 1.5,
            },
            Target {
                name: "added latency p50",
                measured: format!("{added_p50:.0} µs"),
                goal: "≤ 150 µs".into(),
                met: added_p50 <= 150.0,
            },
            Target {
                name: "added latency p99",
                measured: format!("{added_p99:.0} µs"),
                goal: "≤ 500 µs".into(),
                met: added_p99 <= 500.0,
            },
            Target {
                name: "CPU per admitted request (saturated)",
                measured: format!("{cpu:.1} µs"),
                goal: "≤ 60 µs".into(),
                met: cpu <= 60.0,
            },
            Target {
                name: "CPU per admitted request (at the fixed rate)",
                measured: format!("{cpu_at_rate:.1} µs"),
                goal: "≤ 60 µs".into(),
                met: cpu_at_rate <= 60.0,
            },
            Target {
                name: "many warm keys ÷ single key",
                measured: format!("{:.2}", warm / admitted),
                goal: "≥ 0.90".into(),
                met: warm / admitted >= 0.9,
            },
            Target {
                name: "bursts admitting exactly the quota",
                measured: format!("{exact}/{}", self.bursts.len()),
                goal: "all".into(),
                met: exact == self.bursts.len(),
            },
        ]
    }

    fn burst_exact(&self, burst: &Value) -> bool {
        let quota = u64::try_from(self.args.burst_quota).unwrap_or(0);
        burst["admitted"].as_u64() == Some(quota)
            && burst["quota_exhausted"].as_u64() == Some(self.args.burst_requests - quota)
            && burst["units_used_in_usage"].as_i64() == Some(self.args.burst_quota)
    }

    fn print(&self) {
        println!(
            "\nsaturation, closed loop (wrk, {} threads, {} connections, median of {}):",
            WRK_THREADS, self.args.connections, self.args.repeats
        );
        for (name, runs) in [
            ("upstream directly", &self.direct),
            ("nginx plain proxy", &self.nginx),
            ("paygate, admitted", &self.admitted),
            ("paygate, 402 quota_exhausted", &self.quota_402),
            ("paygate, many keys, cold pass", &self.cold),
            ("paygate, many keys, warm", &self.warm),
        ] {
            println!("  {name:<32} {:>9.0} requests/s", rps(runs));
        }
        println!(
            "\nlatency, open loop at {} requests/s (oha, corrected for coordinated omission, median of {}):",
            self.args.rate, self.args.repeats
        );
        println!(
            "  {:<32} {:>9} {:>9} {:>9}",
            "", "p50 µs", "p99 µs", "p99.9 µs"
        );
        for (name, runs) in [
            ("upstream directly", &self.latency_direct),
            ("nginx plain proxy", &self.latency_nginx),
            ("paygate, admitted", &self.latency_gateway),
        ] {
            println!(
                "  {name:<32} {:>9.0} {:>9.0} {:>9.0}",
                latency_median(runs, |l| l.p50),
                latency_median(runs, |l| l.p99),
                latency_median(runs, |l| l.p999)
            );
        }
        for (name, runs) in [
            ("added by nginx", &self.latency_nginx),
            ("added by paygate", &self.latency_gateway),
        ] {
            println!(
                "  {name:<32} {:>9.0} {:>9.0} {:>9.0}",
                latency_median(runs, |l| l.p50) - latency_median(&self.latency_direct, |l| l.p50),
                latency_median(runs, |l| l.p99) - latency_median(&self.latency_direct, |l| l.p99),
                latency_median(runs, |l| l.p999) - latency_median(&self.latency_direct, |l| l.p999)
            );
        }
        for (name, shares) in [
            ("saturated", &self.cpu_per_admitted),
            ("at the fixed rate", &self.cpu_at_rate),
        ] {
            let cpu = cpu_median(shares);
            let parts: Vec<String> = cpu["per_process_us"]
                .as_object()
                .map(|parts| {
                    parts
                        .iter()
                        .map(|(name, micros)| {
                            format!("{name} {:.1}", micros.as_f64().unwrap_or(f64::NAN))
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "\nCPU per admitted request, {name}: {:.1} µs ({})",
                cpu["total_us"].as_f64().unwrap_or(f64::NAN),
                parts.join(", ")
            );
        }
        println!(
            "\nbursts: quota {}, {} requests on {} connections; admitted per trial: {}",
            self.args.burst_quota,
            self.args.burst_requests,
            self.args.burst_connections,
            self.bursts
                .iter()
                .map(|burst| burst["admitted"].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("\n{:<46} {:>10} {:>10}  met", "target", "measured", "goal");
        for target in self.targets() {
            println!(
                "{:<46} {:>10} {:>10}  {}",
                target.name,
                target.measured,
                target.goal,
                if target.met { "yes" } else { "NO" }
            );
        }
    }

    fn to_json(&self) -> Value {
        let throughput = |runs: &[Throughput]| {
            json!({
                "median_rps": rps(runs),
                "runs": runs.iter().map(|run| json!({"requests": run.requests, "seconds": run.seconds, "rps": run.per_second()})).collect::<Vec<_>>(),
            })
        };
        let latency = |runs: &[Latency]| {
            json!({
                "median_us": {
                    "p50": latency_median(runs, |l| l.p50),
                    "p99": latency_median(runs, |l| l.p99),
                    "p99.9": latency_median(runs, |l| l.p999),
                },
                "runs": runs.iter().map(|run| json!({"p50_us": run.p50, "p99_us": run.p99, "p99.9_us": run.p999, "ok": run.ok, "total": run.total})).collect::<Vec<_>>(),
            })
        };
        let exact = self
            .bursts
            .iter()
            .filter(|burst| self.burst_exact(burst))
            .count();
        json!({
            "label": self.args.label,
            "settings": {
                "seconds": self.args.seconds,
                "latency_seconds": self.args.latency_seconds,
                "repeats": self.args.repeats,
                "rate": self.args.rate,
                "connections": self.args.connections,
                "wrk_threads": WRK_THREADS,
                "keys": self.args.keys,
                "worker_threads": self.args.worker_threads,
                "backend_deadline_ms": self.args.backend_deadline_ms,
                "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            },
            "saturation": {
                "direct": throughput(&self.direct),
                "nginx": throughput(&self.nginx),
                "admitted": throughput(&self.admitted),
                "quota_exhausted_402": throughput(&self.quota_402),
                "many_keys_cold": throughput(&self.cold),
                "many_keys_warm": throughput(&self.warm),
            },
            "latency": {
                "direct": latency(&self.latency_direct),
                "nginx": latency(&self.latency_nginx),
                "admitted": latency(&self.latency_gateway),
            },
            "cpu_per_admitted_request": {
                "saturated": cpu_median(&self.cpu_per_admitted),
                "at_rate": cpu_median(&self.cpu_at_rate),
            },
            "burst": {
                "quota": self.args.burst_quota,
                "requests": self.args.burst_requests,
                "connections": self.args.burst_connections,
                "trials": self.bursts.len(),
                "exact_trials": exact,
                "runs": self.bursts,
            },
            "targets": self.targets().iter().map(|target| json!({
                "name": target.name,
                "measured": target.measured,
                "goal": target.goal,
                "met": target.met,
            })).collect::<Vec<_>>(),
        })
    }
}
