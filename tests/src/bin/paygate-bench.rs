//! The side-by-side benchmark (run it with `bench/run`): paygate's gateway, usage and billing as separate
//! release processes against real PostgreSQL and Redis, next to nginx as a plain reverse proxy to the same
//! upstream (nginx answering `200 ok` itself), all on this machine's cores. Load comes from `wrk` (closed
//! loop, saturation) and `oha` (open loop at a fixed rate, corrected for coordinated omission; and the
//! exactness bursts). The admitted-path phases run once per gateway mode (`GATEWAY_LEASES` on and off,
//! each its own gateway process, measured in turn within every repeat) and are printed side by side; two
//! phases with two gateways sharing one customer follow (one hot key through both; a recall from a
//! gateway holding leases). It prints tables with the ratios the targets are stated in and writes the
//! figures as JSON. Every figure is the median of its repeats.

#![allow(clippy::print_stdout)] // printing figures is this program's job

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use integration_tests::bench::{
    KEYS_PER_CUSTOMER, Process, RunningService, START_ATTEMPTS, ServiceSpec, admin_client,
    billing_spec, free_port, gateway_spec, key_with_quota, many_keys, percentile, units_used,
    usage_client, usage_spec,
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
    /// Bursts per gateway mode (each with a customer of its own).
    #[arg(long, default_value_t = 10)]
    burst_trials: usize,
    /// The gateway modes the admitted-path phases run in (`GATEWAY_LEASES`): `both` measures each phase
    /// with leases on and with leases off, side by side. The two-gateway and recall phases always run
    /// with leases on.
    #[arg(long, value_enum, default_value_t = LeaseModes::Both)]
    leases: LeaseModes,
    /// Units of the customer driven through two gateways at once (the exactness trial of that phase).
    #[arg(long, default_value_t = 20_000)]
    pair_quota: i64,
    /// Requests of that trial, split evenly between the two gateways (at least twice the quota).
    #[arg(long, default_value_t = 50_000)]
    pair_requests: u64,
    /// Units of the customer of each recall trial.
    #[arg(long, default_value_t = 20_000)]
    recall_quota: i64,
    /// Requests per second gateway B sends in the recall phase; below the gateway's lease threshold
    /// (20 admissions per second), so B admits per request and its admissions are the ones that recall.
    #[arg(long, default_value_t = 10)]
    recall_slow_rate: u64,
    /// Longest a recall trial may run, in seconds (it normally ends when the quota is exhausted).
    #[arg(long, default_value_t = 60)]
    recall_limit_seconds: u64,
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

/// Which gateway modes the admitted-path phases are measured in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum LeaseModes {
    On,
    Off,
    Both,
}

impl LeaseModes {
    fn modes(self) -> Vec<Mode> {
        match self {
            Self::On => vec![Mode::On],
            Self::Off => vec![Mode::Off],
            Self::Both => vec![Mode::On, Mode::Off],
        }
    }
}

/// A gateway's `GATEWAY_LEASES`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    On,
    Off,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let work = integration_tests::bench::work_dir("paygate-bench");
    let report = run(&args, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let file =
        integration_tests::bench::write_results(&args.results, &args.label, &report.to_json());
    println!("\nfigures written to {}", file.display());
    let failed = report.failed_checks();
    if !failed.is_empty() {
        for check in &failed {
            eprintln!("paygate-bench: FAILED CHECK: {check}");
        }
        std::process::exit(1);
    }
}

/// One gateway process of a mode, with the customer its single-key figures use (a customer per mode, so
/// one mode's leases never share a customer with the other mode's per-request admissions).
struct ModeGateway {
    mode: Mode,
    spec: ServiceSpec,
    running: RunningService,
    single: String,
}

impl ModeGateway {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/bench", self.running.port)
    }

    /// Starts a fresh process (an empty entitlement cache, no leases); nothing else points at the
    /// gateway, so it may come back on another port, picked like the first.
    async fn restart(&mut self) {
        self.running = self.spec.start().await;
    }
}

async fn run<'a>(args: &'a Args, work: &Path) -> Report<'a> {
    let ticks = clock_ticks_per_second();
    let modes = args.leases.modes();
    println!(
        "starting PostgreSQL, Redis, nginx, billing, usage and the gateways (leases {})…",
        modes
            .iter()
            .map(|mode| mode.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
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
    let base_spec = gateway_spec(
        &args.bin_dir,
        work,
        &format!("127.0.0.1:{upstream_port}"),
        args.backend_deadline_ms,
        billing_port,
        usage_port,
    )
    .worker_threads(args.worker_threads);
    let spec_of = |mode: Mode| base_spec.clone().env("GATEWAY_LEASES", mode.name());

    println!("creating customers and keys…");
    let admin = admin_client(billing_port).await;
    let mut gateways = Vec::new();
    for &mode in &modes {
        let spec = spec_of(mode);
        let running = spec.start().await;
        let code = format!("bench-unlimited-{}", mode.name());
        let single = key_with_quota(&admin, &code, 1_000_000_000_000).await.0;
        gateways.push(ModeGateway {
            mode,
            spec,
            running,
            single,
        });
    }
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
    // The upstream and nginx do not look at the key; any will do.
    let any_key = gateways[0].single.clone();
    let load = Load {
        connections: args.connections,
        scripts: &scripts,
    };
    let processes_of = |gateway: &ModeGateway| {
        [
            ("gateway", gateway.running.process.pid()),
            ("usage", usage.process.pid()),
            ("billing", billing.process.pid()),
            ("redis", redis_pid),
        ]
    };

    println!("warming up…");
    for url in [&direct_url, &nginx_url] {
        load.single(url, &any_key, 1).await;
    }
    for gateway in &gateways {
        load.single(&gateway.url(), &gateway.single, 1).await;
        load.single(&gateway.url(), &refused, 1).await;
    }

    let mut figures: Vec<ModeFigures> = modes.iter().map(|&mode| ModeFigures::new(mode)).collect();
    println!(
        "saturation (closed loop, {} connections, {} s each, {} repeats)…",
        args.connections, args.seconds, args.repeats
    );
    let mut direct = Vec::new();
    let mut nginx = Vec::new();
    for _ in 0..args.repeats {
        direct.push(
            load.single(&direct_url, &any_key, args.seconds)
                .await
                .expect_all_ok("direct"),
        );
        nginx.push(
            load.single(&nginx_url, &any_key, args.seconds)
                .await
                .expect_all_ok("nginx"),
        );
        for (gateway, figures) in gateways.iter().zip(&mut figures) {
            let processes = processes_of(gateway);
            let via_before = Admissions::of(gateway.running.metrics_port).await;
            let before = cpu_of(&processes, ticks);
            let run = load
                .single(&gateway.url(), &gateway.single, args.seconds)
                .await
                .expect_all_ok(&format!("admitted, leases {}", gateway.mode.name()));
            let after = cpu_of(&processes, ticks);
            let via_after = Admissions::of(gateway.running.metrics_port).await;
            figures
                .cpu_per_admitted
                .push(CpuShare::between(&before, &after, run.requests));
            figures
                .lease_share_saturated
                .push(via_after.lease_share_since(&via_before));
            figures.admitted.push(run);
            figures.quota_402.push(
                load.single(&gateway.url(), &refused, args.seconds)
                    .await
                    .expect_none_ok(&format!("402, leases {}", gateway.mode.name())),
            );
        }
    }

    println!("{} distinct keys: a cold pass, then warm…", many.len());
    for repeat in 0..args.repeats {
        for (gateway, figures) in gateways.iter_mut().zip(&mut figures) {
            if repeat > 0 {
                gateway.restart().await;
                load.single(&gateway.url(), &gateway.single, 1).await;
            }
            figures.cold.push(
                each_key_once(&gateway.url(), &many, args.connections)
                    .await
                    .expect_all_ok("cold keys"),
            );
            figures.warm.push(
                load.keys(&gateway.url(), &keys_file, args.seconds)
                    .await
                    .expect_all_ok("warm keys"),
            );
        }
    }

    println!(
        "latency (open loop at {} requests/s, {} s each)…",
        args.rate, args.latency_seconds
    );
    let mut latency_direct = Vec::new();
    let mut latency_nginx = Vec::new();
    for _ in 0..args.repeats {
        latency_direct
            .push(oha_at_rate(&direct_url, &any_key, args.rate, args.latency_seconds).await);
        latency_nginx
            .push(oha_at_rate(&nginx_url, &any_key, args.rate, args.latency_seconds).await);
        for (gateway, figures) in gateways.iter().zip(&mut figures) {
            let processes = processes_of(gateway);
            let via_before = Admissions::of(gateway.running.metrics_port).await;
            let before = cpu_of(&processes, ticks);
            let run = oha_at_rate(
                &gateway.url(),
                &gateway.single,
                args.rate,
                args.latency_seconds,
            )
            .await;
            let after = cpu_of(&processes, ticks);
            let via_after = Admissions::of(gateway.running.metrics_port).await;
            figures
                .cpu_at_rate
                .push(CpuShare::between(&before, &after, run.ok));
            figures
                .lease_share_at_rate
                .push(via_after.lease_share_since(&via_before));
            figures.latency.push(run);
        }
    }

    println!(
        "bursts: quota {}, {} requests on {} connections, {} trials per mode…",
        args.burst_quota, args.burst_requests, args.burst_connections, args.burst_trials
    );
    let usage_client = usage_client(usage_port).await;
    for (gateway, figures) in gateways.iter().zip(&mut figures) {
        for trial in 0..args.burst_trials {
            let code = format!("bench-burst-{}-{trial}", gateway.mode.name());
            let (key, subscription) = key_with_quota(&admin, &code, args.burst_quota).await;
            let statuses = oha_burst(
                &gateway.url(),
                &key,
                args.burst_requests,
                args.burst_connections,
            )
            .await;
            let counted = units_used(&usage_client, &subscription).await;
            figures.bursts.push(json!({
                "admitted": statuses.get("200").copied().unwrap_or(0),
                "quota_exhausted": statuses.get("402").copied().unwrap_or(0),
                "statuses": statuses,
                "units_used_in_usage": counted,
            }));
        }
    }
    drop(gateways);

    // Two gateways with leases on, sharing billing and usage (and so Redis) and one customer.
    let spec_on = spec_of(Mode::On);
    let pair = [spec_on.start().await, spec_on.start().await];
    let pair_urls = pair
        .each_ref()
        .map(|gateway| format!("http://127.0.0.1:{}/v1/bench", gateway.port));

    println!(
        "two gateways, one hot key, leases on: {} connections split between them, {} s each…",
        args.connections, args.seconds
    );
    let pair_key = key_with_quota(&admin, "bench-pair-unlimited", 1_000_000_000_000)
        .await
        .0;
    for url in &pair_urls {
        load.single(url, &pair_key, 1).await;
    }
    let mut pair_figures = PairFigures::default();
    for _ in 0..args.repeats {
        let before = [
            Admissions::of(pair[0].metrics_port).await,
            Admissions::of(pair[1].metrics_port).await,
        ];
        let half = (args.connections / 2).max(1);
        let (first, second) = tokio::join!(
            load.split(&pair_urls[0], &pair_key, args.seconds, 1, half),
            load.split(&pair_urls[1], &pair_key, args.seconds, 1, half),
        );
        let after = [
            Admissions::of(pair[0].metrics_port).await,
            Admissions::of(pair[1].metrics_port).await,
        ];
        pair_figures.lease_share.push(
            after[0]
                .plus(&after[1])
                .lease_share_since(&before[0].plus(&before[1])),
        );
        pair_figures.throughput.push([
            first.expect_all_ok("two gateways, first"),
            second.expect_all_ok("two gateways, second"),
        ]);
    }
    println!(
        "two gateways, exactness: quota {}, {} requests split between them on {} connections, {} trials…",
        args.pair_quota, args.pair_requests, args.burst_connections, args.repeats
    );
    for trial in 0..args.repeats {
        let code = format!("bench-pair-{trial}");
        let (key, subscription) = key_with_quota(&admin, &code, args.pair_quota).await;
        let half = (args.burst_connections / 2).max(1);
        let first_requests = args.pair_requests / 2;
        let (first, second) = tokio::join!(
            oha_burst(&pair_urls[0], &key, first_requests, half),
            oha_burst(
                &pair_urls[1],
                &key,
                args.pair_requests - first_requests,
                half
            ),
        );
        let counted = units_used(&usage_client, &subscription).await;
        pair_figures.trials.push(ExactnessTrial::of(
            args.pair_quota,
            [first, second],
            counted,
        ));
    }

    println!(
        "recall: gateway A closed loop on {} connections, gateway B {} requests/s, quota {}, {} trials…",
        args.connections, args.recall_slow_rate, args.recall_quota, args.repeats
    );
    let mut recalls = Vec::new();
    for trial in 0..args.repeats {
        let code = format!("bench-recall-{trial}");
        let (key, subscription) = key_with_quota(&admin, &code, args.recall_quota).await;
        let setup = RecallSetup {
            urls: [&pair_urls[0], &pair_urls[1]],
            key: &key,
            quota: args.recall_quota,
            connections: args.connections,
            slow_rate: args.recall_slow_rate,
            limit: Duration::from_secs(args.recall_limit_seconds),
            usage_metrics_port: usage.metrics_port,
            gateway_metrics_ports: [pair[0].metrics_port, pair[1].metrics_port],
        };
        let mut trial = recall_trial(&setup).await;
        trial.units_used_in_usage = units_used(&usage_client, &subscription).await;
        recalls.push(trial);
    }
    drop(pair);

    let report = Report {
        args,
        direct,
        nginx,
        latency_direct,
        latency_nginx,
        modes: figures,
        pair: pair_figures,
        recalls,
    };
    report.print();
    report
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

    /// Notes the run when an answer was not 2xx or a socket failed. Not a panic: on a busy machine a
    /// billing call can miss the gateway's deadline (a 503), and one such answer must not lose every
    /// other figure of the run; the note is printed with them.
    fn expect_all_ok(self, what: &str) -> Self {
        if self.not_ok != 0 || self.socket_errors != 0 {
            note_unexpected(format!(
                "{what}: {} of {} answers were not 2xx, {} socket errors",
                self.not_ok, self.requests, self.socket_errors
            ));
        }
        self
    }

    fn expect_none_ok(self, what: &str) -> Self {
        if self.not_ok != self.requests || self.socket_errors != 0 {
            note_unexpected(format!(
                "{what}: {} of {} answers were 2xx, {} socket errors",
                self.requests - self.not_ok,
                self.requests,
                self.socket_errors
            ));
        }
        self
    }
}

/// Runs whose answers were not all what the phase expects (their figures include those answers).
static UNEXPECTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note_unexpected(what: String) {
    eprintln!("paygate-bench: unexpected answers in {what}");
    UNEXPECTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(what);
}

fn unexpected() -> Vec<String> {
    UNEXPECTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

struct Load<'a> {
    connections: u64,
    scripts: &'a WrkScripts,
}

impl Load<'_> {
    async fn single(&self, url: &str, key: &str, seconds: u64) -> Throughput {
        self.split(url, key, seconds, WRK_THREADS, self.connections)
            .await
    }

    /// Like `single`, with `threads` and `connections` of its own (for loads run at once on several
    /// gateways, sharing the load generator's cores as one run would).
    async fn split(
        &self,
        url: &str,
        key: &str,
        seconds: u64,
        threads: u64,
        connections: u64,
    ) -> Throughput {
        let mut command = wrk(seconds.max(1), threads, connections);
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {key}"))
            .arg("-s")
            .arg(&self.scripts.summary)
            .arg(url);
        run_wrk(command).await
    }

    async fn keys(&self, url: &str, keys_file: &Path, seconds: u64) -> Throughput {
        let mut command = wrk(seconds.max(1), WRK_THREADS, self.connections);
        // wrk hands the URL and what follows it to the script's `init` (the URL as args[0]).
        command
            .arg("-s")
            .arg(&self.scripts.keys)
            .arg(url)
            .arg(keys_file)
            .arg(WRK_THREADS.to_string());
        run_wrk(command).await
    }
}

fn wrk(seconds: u64, threads: u64, connections: u64) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--timeout")
        .arg("10s");
    command
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

// ----- metrics of the services -----

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// Returns the Prometheus text a service serves on `port` (empty when it does not answer within 5 s, so
/// a figure read from it comes out as 0 rather than losing the run).
async fn scrape(client: &HttpClient, port: u16) -> String {
    let request = http::Request::get(format!("http://127.0.0.1:{port}/metrics"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("a valid request");
    let fetch = async {
        let answer = client.request(request).await.ok()?;
        let body = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .ok()?
            .to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Sums the samples of `name` whose labels include every one of `labels` (Prometheus text format).
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (own_labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let end = rest.find('}')?;
                    (&rest[..end], &rest[end + 1..])
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let matches = labels.iter().all(|(label, wanted)| {
                own_labels
                    .split(',')
                    .any(|pair| pair == format!("{label}=\"{wanted}\""))
            });
            matches.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A gateway's `paygate_gateway_admissions_total` by where the admission was decided, and the recalls
/// it has been sent (`paygate_gateway_lease_events_total{event="recalled"}`).
#[derive(Clone, Copy, Default)]
struct Admissions {
    via_lease: f64,
    via_usage: f64,
    recalled: f64,
}

impl Admissions {
    async fn of(metrics_port: u16) -> Self {
        let text = scrape(&integration_tests::http_client(), metrics_port).await;
        let via = |via| metric_sum(&text, "paygate_gateway_admissions_total", &[("via", via)]);
        Self {
            via_lease: via("lease"),
            via_usage: via("usage"),
            recalled: metric_sum(
                &text,
                "paygate_gateway_lease_events_total",
                &[("event", "recalled")],
            ),
        }
    }

    fn plus(&self, other: &Self) -> Self {
        Self {
            via_lease: self.via_lease + other.via_lease,
            via_usage: self.via_usage + other.via_usage,
            recalled: self.recalled + other.recalled,
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            via_lease: self.via_lease - before.via_lease,
            via_usage: self.via_usage - before.via_usage,
            recalled: self.recalled - before.recalled,
        }
    }

    /// The share of the admissions since `before` that were decided from a lease (NaN when none).
    fn lease_share_since(&self, before: &Self) -> f64 {
        let delta = self.since(before);
        delta.via_lease / (delta.via_lease + delta.via_usage)
    }
}

/// `paygate_usage_leases_recalled_total`: leases usage has recalled so far.
async fn usage_recalls(client: &HttpClient, metrics_port: u16) -> f64 {
    metric_sum(
        &scrape(client, metrics_port).await,
        "paygate_usage_leases_recalled_total",
        &[],
    )
}

// ----- the two-gateway phases -----

/// Figures of the mode's admitted-path phases.
struct ModeFigures {
    mode: Mode,
    admitted: Vec<Throughput>,
    quota_402: Vec<Throughput>,
    cold: Vec<Throughput>,
    warm: Vec<Throughput>,
    cpu_per_admitted: Vec<CpuShare>,
    cpu_at_rate: Vec<CpuShare>,
    latency: Vec<Latency>,
    /// Share of the admissions decided from a lease, per run.
    lease_share_saturated: Vec<f64>,
    lease_share_at_rate: Vec<f64>,
    bursts: Vec<Value>,
}

impl ModeFigures {
    fn new(mode: Mode) -> Self {
        Self {
            mode,
            admitted: Vec::new(),
            quota_402: Vec::new(),
            cold: Vec::new(),
            warm: Vec::new(),
            cpu_per_admitted: Vec::new(),
            cpu_at_rate: Vec::new(),
            latency: Vec::new(),
            lease_share_saturated: Vec::new(),
            lease_share_at_rate: Vec::new(),
            bursts: Vec::new(),
        }
    }
}

/// Figures of "two gateways, one hot key".
#[derive(Default)]
struct PairFigures {
    /// Each repeat's closed-loop run through each gateway (at the same time).
    throughput: Vec<[Throughput; 2]>,
    lease_share: Vec<f64>,
    trials: Vec<ExactnessTrial>,
}

impl PairFigures {
    fn total_rps(&self) -> f64 {
        median(
            self.throughput
                .iter()
                .map(|runs| runs[0].per_second() + runs[1].per_second()),
        )
    }
}

/// One customer with a quota, sent more requests than it through two gateways at once.
struct ExactnessTrial {
    quota: i64,
    per_gateway: [BTreeMap<String, u64>; 2],
    units_used_in_usage: i64,
}

impl ExactnessTrial {
    fn of(quota: i64, per_gateway: [BTreeMap<String, u64>; 2], units_used_in_usage: i64) -> Self {
        Self {
            quota,
            per_gateway,
            units_used_in_usage,
        }
    }

    fn count(&self, status: &str) -> u64 {
        self.per_gateway
            .iter()
            .map(|statuses| statuses.get(status).copied().unwrap_or(0))
            .sum()
    }

    fn requests(&self) -> u64 {
        self.per_gateway
            .iter()
            .flat_map(|statuses| statuses.values())
            .sum()
    }

    /// Exactly the quota admitted, every other request refused with 402, and usage agreeing.
    fn exact(&self) -> bool {
        let quota = u64::try_from(self.quota).unwrap_or(0);
        self.count("200") == quota
            && self.count("402") == self.requests() - quota
            && self.units_used_in_usage == self.quota
    }

    fn to_json(&self) -> Value {
        json!({
            "quota": self.quota,
            "requests": self.requests(),
            "admitted": self.count("200"),
            "quota_exhausted": self.count("402"),
            "statuses_per_gateway": self.per_gateway,
            "units_used_in_usage": self.units_used_in_usage,
            "exact": self.exact(),
        })
    }
}

/// What a recall trial runs against.
struct RecallSetup<'a> {
    /// Gateway A (driven hard, so it holds leases) and gateway B (slow, admitting per request).
    urls: [&'a str; 2],
    key: &'a str,
    quota: i64,
    connections: u64,
    slow_rate: u64,
    limit: Duration,
    usage_metrics_port: u16,
    gateway_metrics_ports: [u16; 2],
}

/// One answer of a recall trial: which gateway (0 = A, 1 = B), when it was sent and answered (µs since
/// the trial's start), and its status (0: no answer within 10 s).
#[derive(Clone, Copy)]
struct Answered {
    gateway: usize,
    sent_us: f64,
    answered_us: f64,
    status: u16,
}

impl Answered {
    fn latency_us(&self) -> f64 {
        self.answered_us - self.sent_us
    }
}

/// A request "waited" (took the recall path) when its latency is above this, or above twice its
/// gateway's p99 before the first recall, whichever is higher: a recall waits for the holder's return,
/// which no request decided without one does.
const WAITED_AT_LEAST_US: f64 = 5_000.0;

/// Figures of one recall trial.
struct RecallTrial {
    quota: i64,
    answers: Vec<Answered>,
    /// The first recall, seen between these instants (µs since the trial's start): usage's recall counter
    /// had not risen at the scrape started at the first, and had at the scrape that ended at the second.
    first_recall_us: Option<(f64, f64)>,
    usage_recalls: f64,
    gateways: [Admissions; 2],
    limit_reached: bool,
    units_used_in_usage: i64,
}

/// Sends one request with `key`, timed against `origin`.
async fn send_timed(
    client: &HttpClient,
    url: &str,
    key: &str,
    gateway: usize,
    origin: Instant,
) -> Answered {
    let request = http::Request::get(url)
        .header("authorization", format!("Bearer {key}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("a valid request");
    let sent_us = origin.elapsed().as_secs_f64() * 1e6;
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let answer = client.request(request).await.ok()?;
        let status = answer.status().as_u16();
        let _ = http_body_util::BodyExt::collect(answer.into_body()).await;
        Some(status)
    })
    .await;
    Answered {
        gateway,
        sent_us,
        answered_us: origin.elapsed().as_secs_f64() * 1e6,
        status: answer.ok().flatten().unwrap_or(0),
    }
}

/// Drives the customer through gateway A in a closed loop and through gateway B at a slow fixed rate
/// until each has been refused with 402 (the quota is then gone: a refusal is answered only once the
/// units are really gone) or the limit passes, timing every answer, while watching usage's recall
/// counter for the first recall.
async fn recall_trial(setup: &RecallSetup<'_>) -> RecallTrial {
    let client = integration_tests::http_client();
    let baseline_recalls = usage_recalls(&client, setup.usage_metrics_port).await;
    let gateways_before = [
        Admissions::of(setup.gateway_metrics_ports[0]).await,
        Admissions::of(setup.gateway_metrics_ports[1]).await,
    ];
    let origin = Instant::now();
    let deadline = origin + setup.limit;
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, done, port) = (client.clone(), done.clone(), setup.usage_metrics_port);
        tokio::spawn(async move {
            let mut unchanged_at = 0.0;
            while !done.load(Ordering::Relaxed) {
                let scrape_started = origin.elapsed().as_secs_f64() * 1e6;
                if usage_recalls(&client, port).await > baseline_recalls {
                    return Some((unchanged_at, origin.elapsed().as_secs_f64() * 1e6));
                }
                unchanged_at = scrape_started;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            None
        })
    };

    let mut workers = JoinSet::new();
    for _ in 0..setup.connections {
        let (client, url, key) = (
            client.clone(),
            setup.urls[0].to_owned(),
            setup.key.to_owned(),
        );
        workers.spawn(async move {
            let mut answers = Vec::new();
            while Instant::now() < deadline {
                let answer = send_timed(&client, &url, &key, 0, origin).await;
                answers.push(answer);
                if answer.status == 402 {
                    break;
                }
            }
            answers
        });
    }
    {
        let (client, url, key) = (
            client.clone(),
            setup.urls[1].to_owned(),
            setup.key.to_owned(),
        );
        let period = Duration::from_secs_f64(1.0 / setup.slow_rate.max(1) as f64);
        workers.spawn(async move {
            let mut answers = Vec::new();
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let answer = send_timed(&client, &url, &key, 1, origin).await;
                answers.push(answer);
                if answer.status == 402 {
                    break;
                }
            }
            answers
        });
    }
    let mut answers = Vec::new();
    while let Some(worker) = workers.join_next().await {
        answers.extend(worker.expect("a recall client task"));
    }
    done.store(true, Ordering::Relaxed);
    let first_recall_us = watcher.await.expect("the recall watcher");
    answers.sort_by(|a, b| a.answered_us.total_cmp(&b.answered_us));
    let gateways_after = [
        Admissions::of(setup.gateway_metrics_ports[0]).await,
        Admissions::of(setup.gateway_metrics_ports[1]).await,
    ];
    RecallTrial {
        quota: setup.quota,
        limit_reached: Instant::now() >= deadline,
        answers,
        first_recall_us,
        usage_recalls: usage_recalls(&client, setup.usage_metrics_port).await - baseline_recalls,
        gateways: [
            gateways_after[0].since(&gateways_before[0]),
            gateways_after[1].since(&gateways_before[1]),
        ],
        units_used_in_usage: -1,
    }
}

impl RecallTrial {
    fn admitted(&self, gateway: Option<usize>) -> u64 {
        self.answers
            .iter()
            .filter(|answer| answer.status == 200 && gateway.is_none_or(|g| answer.gateway == g))
            .count() as u64
    }

    fn count_status(&self, status: u16) -> u64 {
        self.answers
            .iter()
            .filter(|answer| answer.status == status)
            .count() as u64
    }

    /// When the N-th admission (N the quota) was answered, µs since the start.
    fn nth_admission_us(&self) -> Option<f64> {
        let n = usize::try_from(self.quota).ok()?.checked_sub(1)?;
        self.answers
            .iter()
            .filter(|answer| answer.status == 200)
            .nth(n)
            .map(|answer| answer.answered_us)
    }

    /// From the first recall to the N-th admission, in µs: at least and at most (the recall is known only
    /// to lie between two scrapes).
    fn window_us(&self) -> Option<(f64, f64)> {
        let nth = self.nth_admission_us()?;
        let (after, by) = self.first_recall_us?;
        Some((nth - by, nth - after))
    }

    /// The latency above which a request of `gateway` counts as having waited for a recall.
    fn waited_threshold_us(&self, gateway: usize) -> f64 {
        let recall_at = self
            .first_recall_us
            .map_or(f64::INFINITY, |(before, _)| before);
        let mut before: Vec<f64> = self
            .answers
            .iter()
            .filter(|answer| answer.gateway == gateway && answer.answered_us < recall_at)
            .map(Answered::latency_us)
            .collect();
        before.sort_by(f64::total_cmp);
        let p99 = percentile(&before, 0.99);
        if p99.is_nan() {
            WAITED_AT_LEAST_US
        } else {
            WAITED_AT_LEAST_US.max(2.0 * p99)
        }
    }

    /// Requests of `gateway` sent from the first recall on whose latency says they waited.
    fn waited(&self, gateway: usize) -> u64 {
        let Some((recall_from, _)) = self.first_recall_us else {
            return 0;
        };
        let threshold = self.waited_threshold_us(gateway);
        self.answers
            .iter()
            .filter(|answer| {
                answer.gateway == gateway
                    && answer.sent_us >= recall_from
                    && answer.latency_us() > threshold
            })
            .count() as u64
    }

    /// Refusals answered before the N-th admission was (a refusal decided just after it can be answered
    /// just before it, so a few are possible without a false refusal; many are not).
    fn refusals_before_nth(&self) -> u64 {
        self.early_refusals().count() as u64
    }

    fn early_refusals(&self) -> impl Iterator<Item = &Answered> {
        let until = self.nth_admission_us().unwrap_or(f64::INFINITY);
        self.answers
            .iter()
            .filter(move |answer| answer.status == 402 && answer.answered_us < until)
    }

    /// When the first refusal was answered, µs since the start.
    fn first_refusal_us(&self) -> Option<f64> {
        self.answers
            .iter()
            .find(|answer| answer.status == 402)
            .map(|answer| answer.answered_us)
    }

    /// Latencies of gateway B's requests (µs): median of those answered before the first recall, and the
    /// highest of those sent from it on.
    fn slow_gateway_latency(&self) -> (f64, f64) {
        let recall_from = self
            .first_recall_us
            .map_or(f64::INFINITY, |(before, _)| before);
        let mut before: Vec<f64> = self
            .answers
            .iter()
            .filter(|answer| answer.gateway == 1 && answer.answered_us < recall_from)
            .map(Answered::latency_us)
            .collect();
        before.sort_by(f64::total_cmp);
        let after = self
            .answers
            .iter()
            .filter(|answer| answer.gateway == 1 && answer.sent_us >= recall_from)
            .map(Answered::latency_us)
            .fold(f64::NAN, f64::max);
        (percentile(&before, 0.5), after)
    }

    /// Exactly the quota admitted, and usage agreeing.
    fn exact(&self) -> bool {
        self.admitted(None) == u64::try_from(self.quota).unwrap_or(0)
            && self.units_used_in_usage == self.quota
    }

    fn to_json(&self) -> Value {
        let (b_before, b_after) = self.slow_gateway_latency();
        json!({
            "quota": self.quota,
            "admitted": self.admitted(None),
            "admitted_a": self.admitted(Some(0)),
            "admitted_b": self.admitted(Some(1)),
            "quota_exhausted": self.count_status(402),
            "requests": self.answers.len(),
            "requests_b": self.answers.iter().filter(|answer| answer.gateway == 1).count(),
            "no_answer": self.count_status(0),
            "units_used_in_usage": self.units_used_in_usage,
            "exact": self.exact(),
            "limit_reached": self.limit_reached,
            "first_recall_us": self.first_recall_us.map(|(from, to)| json!({"after": from, "by": to})),
            "nth_admission_us": self.nth_admission_us(),
            "first_recall_to_nth_admission_us": self.window_us().map(|(at_least, at_most)| json!({"at_least": at_least, "at_most": at_most})),
            "waited": {"a": self.waited(0), "b": self.waited(1)},
            "waited_threshold_us": {"a": self.waited_threshold_us(0), "b": self.waited_threshold_us(1)},
            "refusals_before_nth_admission": self.refusals_before_nth(),
            "refusals_before_nth_admission_b": self.early_refusals().filter(|answer| answer.gateway == 1).count(),
            "first_refusal_us": self.first_refusal_us(),
            "b_latency_us": {"p50_before_recall": b_before, "max_from_recall": b_after},
            "usage_leases_recalled": self.usage_recalls,
            "gateway_a": {"via_lease": self.gateways[0].via_lease, "via_usage": self.gateways[0].via_usage, "recalls_received": self.gateways[0].recalled},
            "gateway_b": {"via_lease": self.gateways[1].via_lease, "via_usage": self.gateways[1].via_usage, "recalls_received": self.gateways[1].recalled},
        })
    }
}

// ----- the report -----

struct Report<'a> {
    args: &'a Args,
    direct: Vec<Throughput>,
    nginx: Vec<Throughput>,
    latency_direct: Vec<Latency>,
    latency_nginx: Vec<Latency>,
    modes: Vec<ModeFigures>,
    pair: PairFigures,
    recalls: Vec<RecallTrial>,
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|value| !value.is_nan()).collect();
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

/// A figure per mode (in the order of the report's modes) against its goal.
struct Target {
    name: &'static str,
    measured: Vec<String>,
    goal: &'static str,
    met: Vec<bool>,
}

impl Target {
    fn per_mode(
        name: &'static str,
        goal: &'static str,
        modes: &[ModeFigures],
        figure: impl Fn(&ModeFigures) -> (String, bool),
    ) -> Self {
        let (measured, met) = modes.iter().map(figure).unzip();
        Self {
            name,
            measured,
            goal,
            met,
        }
    }
}

impl ModeFigures {
    fn added(&self, direct: &[Latency], pick: fn(&Latency) -> f64) -> f64 {
        latency_median(&self.latency, pick) - latency_median(direct, pick)
    }

    fn cpu(shares: &[CpuShare]) -> f64 {
        median(shares.iter().map(|share| share.total))
    }

    fn exact_bursts(&self, args: &Args) -> usize {
        self.bursts
            .iter()
            .filter(|burst| burst_exact(args, burst))
            .count()
    }
}

fn burst_exact(args: &Args, burst: &Value) -> bool {
    let quota = u64::try_from(args.burst_quota).unwrap_or(0);
    burst["admitted"].as_u64() == Some(quota)
        && burst["quota_exhausted"].as_u64() == Some(args.burst_requests.saturating_sub(quota))
        && burst["units_used_in_usage"].as_i64() == Some(args.burst_quota)
}

fn share(value: f64) -> String {
    if value.is_nan() {
        "—".into()
    } else {
        format!("{:.1}%", value * 100.0)
    }
}

fn millis(micros: Option<f64>) -> String {
    micros.map_or_else(|| "—".into(), |micros| format!("{:.1} ms", micros / 1e3))
}

impl Report<'_> {
    fn targets(&self) -> Vec<Target> {
        let nginx = rps(&self.nginx);
        let direct = &self.latency_direct;
        let args = self.args;
        vec![
            Target::per_mode(
                "admitted ÷ nginx plain proxy",
                "≥ 0.60",
                &self.modes,
                |m| {
                    let ratio = rps(&m.admitted) / nginx;
                    (format!("{ratio:.2}"), ratio >= 0.6)
                },
            ),
            Target::per_mode("402 path ÷ admitted", "≥ 1.50", &self.modes, |m| {
                let ratio = rps(&m.quota_402) / rps(&m.admitted);
                (format!("{ratio:.2}"), ratio >= 1.5)
            }),
            Target::per_mode("added latency p50", "≤ 100 µs", &self.modes, |m| {
                let added = m.added(direct, |l| l.p50);
                (format!("{added:.0} µs"), added <= 100.0)
            }),
            Target::per_mode("added latency p99", "≤ 400 µs", &self.modes, |m| {
                let added = m.added(direct, |l| l.p99);
                (format!("{added:.0} µs"), added <= 400.0)
            }),
            Target::per_mode(
                "CPU per admitted request (saturated)",
                "≤ 40 µs",
                &self.modes,
                |m| {
                    let cpu = ModeFigures::cpu(&m.cpu_per_admitted);
                    (format!("{cpu:.1} µs"), cpu <= 40.0)
                },
            ),
            Target::per_mode(
                "CPU per admitted request (at the fixed rate)",
                "≤ 40 µs",
                &self.modes,
                |m| {
                    let cpu = ModeFigures::cpu(&m.cpu_at_rate);
                    (format!("{cpu:.1} µs"), cpu <= 40.0)
                },
            ),
            Target::per_mode(
                "many warm keys ÷ single key",
                "≥ 0.90",
                &self.modes,
                |m| {
                    let ratio = rps(&m.warm) / rps(&m.admitted);
                    (format!("{ratio:.2}"), ratio >= 0.9)
                },
            ),
            Target::per_mode(
                "bursts admitting exactly the quota",
                "all",
                &self.modes,
                |m| {
                    let exact = m.exact_bursts(args);
                    (
                        format!("{exact}/{}", m.bursts.len()),
                        exact == m.bursts.len(),
                    )
                },
            ),
        ]
    }

    /// Exactness checks that failed, one line each (empty when all held).
    fn failed_checks(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for mode in &self.modes {
            let exact = mode.exact_bursts(self.args);
            if exact != mode.bursts.len() {
                failed.push(format!(
                    "bursts with leases {}: {exact} of {} admitted exactly the quota",
                    mode.mode.name(),
                    mode.bursts.len()
                ));
            }
        }
        for (index, trial) in self.pair.trials.iter().enumerate() {
            if !trial.exact() {
                failed.push(format!(
                    "two gateways, trial {}: {} admitted and {} refused of {} requests, usage counted {}; quota {}",
                    index + 1,
                    trial.count("200"),
                    trial.count("402"),
                    trial.requests(),
                    trial.units_used_in_usage,
                    trial.quota
                ));
            }
        }
        for (index, trial) in self.recalls.iter().enumerate() {
            if !trial.exact() {
                failed.push(format!(
                    "recall, trial {}: {} admitted, usage counted {}; quota {}{}",
                    index + 1,
                    trial.admitted(None),
                    trial.units_used_in_usage,
                    trial.quota,
                    if trial.limit_reached {
                        " (the trial's time limit passed before the quota was exhausted)"
                    } else {
                        ""
                    }
                ));
            }
        }
        failed
    }

    fn mode_header(&self) -> String {
        self.modes
            .iter()
            .map(|mode| format!("{:>12}", format!("leases {}", mode.mode.name())))
            .collect()
    }

    fn mode_row(&self, name: &str, figure: impl Fn(&ModeFigures) -> String) -> String {
        let cells: String = self
            .modes
            .iter()
            .map(|mode| format!("{:>12}", figure(mode)))
            .collect();
        format!("  {name:<36}{cells}")
    }

    fn print(&self) {
        let args = self.args;
        println!(
            "\nsaturation, closed loop (wrk, {} threads, {} connections, median of {}), requests/s:",
            WRK_THREADS, args.connections, args.repeats
        );
        println!(
            "  {:<36}{:>12}",
            "upstream directly",
            format!("{:.0}", rps(&self.direct))
        );
        println!(
            "  {:<36}{:>12}",
            "nginx plain proxy",
            format!("{:.0}", rps(&self.nginx))
        );
        println!("  {:<36}{}", "paygate", self.mode_header());
        for (name, pick) in [
            (
                "admitted",
                (|m: &ModeFigures| &m.admitted) as fn(&ModeFigures) -> &Vec<Throughput>,
            ),
            ("402 quota_exhausted", |m| &m.quota_402),
            ("many keys, cold pass", |m| &m.cold),
            ("many keys, warm", |m| &m.warm),
        ] {
            println!(
                "{}",
                self.mode_row(name, |m| format!("{:.0}", rps(pick(m))))
            );
        }
        println!(
            "{}",
            self.mode_row("admitted from leases", |m| share(median(
                m.lease_share_saturated.iter().copied()
            )))
        );

        println!(
            "\nlatency, open loop at {} requests/s (oha, corrected for coordinated omission, median of {}), µs:",
            args.rate, args.repeats
        );
        println!("  {:<36}{:>10}{:>10}{:>10}", "", "p50", "p99", "p99.9");
        let row = |name: &str, runs: &[Latency], minus: Option<&[Latency]>| {
            let figure = |pick: fn(&Latency) -> f64| {
                latency_median(runs, pick) - minus.map_or(0.0, |base| latency_median(base, pick))
            };
            println!(
                "  {name:<36}{:>10.0}{:>10.0}{:>10.0}",
                figure(|l| l.p50),
                figure(|l| l.p99),
                figure(|l| l.p999)
            );
        };
        row("upstream directly", &self.latency_direct, None);
        row("nginx plain proxy", &self.latency_nginx, None);
        for mode in &self.modes {
            row(
                &format!("paygate, leases {}", mode.mode.name()),
                &mode.latency,
                None,
            );
        }
        row(
            "added by nginx",
            &self.latency_nginx,
            Some(&self.latency_direct),
        );
        for mode in &self.modes {
            row(
                &format!("added by paygate, leases {}", mode.mode.name()),
                &mode.latency,
                Some(&self.latency_direct),
            );
        }
        println!(
            "{}",
            self.mode_row("admitted from leases", |m| share(median(
                m.lease_share_at_rate.iter().copied()
            )))
        );

        for mode in &self.modes {
            for (name, shares) in [
                ("saturated", &mode.cpu_per_admitted),
                ("at the fixed rate", &mode.cpu_at_rate),
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
                    "{}CPU per admitted request, leases {}, {name}: {:.1} µs ({})",
                    if name == "saturated" { "\n" } else { "" },
                    mode.mode.name(),
                    cpu["total_us"].as_f64().unwrap_or(f64::NAN),
                    parts.join(", ")
                );
            }
        }

        println!(
            "\nbursts: quota {}, {} requests on {} connections; admitted per trial:",
            args.burst_quota, args.burst_requests, args.burst_connections
        );
        for mode in &self.modes {
            println!(
                "  leases {}: {}",
                mode.mode.name(),
                mode.bursts
                    .iter()
                    .map(|burst| burst["admitted"].to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        self.print_pair();
        self.print_recalls();

        println!(
            "\nleases on vs off, side by side (same run; \"met\" per column):\n{:<46}{}{:>10}  met",
            "target",
            self.mode_header(),
            "goal"
        );
        for target in self.targets() {
            let cells: String = target
                .measured
                .iter()
                .map(|measured| format!("{measured:>12}"))
                .collect();
            let met: Vec<&str> = target
                .met
                .iter()
                .map(|&met| if met { "yes" } else { "NO" })
                .collect();
            println!(
                "{:<46}{cells}{:>10}  {}",
                target.name,
                target.goal,
                met.join(" / ")
            );
        }
        let pair_ratio = self.pair.total_rps() / rps(&self.nginx);
        println!(
            "{:<46}{:>12}{:>10}  {}",
            "two gateways, one hot key ÷ nginx",
            format!("{pair_ratio:.2}"),
            "≥ 0.60",
            if pair_ratio >= 0.6 { "yes" } else { "NO" }
        );

        let unexpected = unexpected();
        if !unexpected.is_empty() {
            println!("\nruns with unexpected answers (counted in their figures):");
            for what in &unexpected {
                println!("  {what}");
            }
        }
        let failed = self.failed_checks();
        if failed.is_empty() {
            println!("\nexactness checks: all held");
        } else {
            println!("\n!!!!!!!! EXACTNESS CHECKS FAILED !!!!!!!!");
            for check in &failed {
                println!("!! {check}");
            }
        }
    }

    fn print_pair(&self) {
        let args = self.args;
        let pair = &self.pair;
        let per_gateway = |index: usize| {
            median(
                pair.throughput
                    .iter()
                    .map(|runs: &[Throughput; 2]| runs[index].per_second()),
            )
        };
        println!(
            "\ntwo gateways, one hot key, leases on (wrk, 1 thread and {} connections per gateway, at once, median of {}):",
            (args.connections / 2).max(1),
            args.repeats
        );
        println!(
            "  admitted, requests/s: {:.0} in total ({:.0} + {:.0}), {:.2} × nginx plain proxy; admitted from leases {}",
            pair.total_rps(),
            per_gateway(0),
            per_gateway(1),
            pair.total_rps() / rps(&self.nginx),
            share(median(pair.lease_share.iter().copied()))
        );
        println!(
            "  exactness, quota {} and {} requests split between the gateways:",
            args.pair_quota, args.pair_requests
        );
        for (index, trial) in pair.trials.iter().enumerate() {
            println!(
                "    trial {}: admitted {} (N = {}), refused {}, other {}, usage counted {}: {}",
                index + 1,
                trial.count("200"),
                trial.quota,
                trial.count("402"),
                trial.requests() - trial.count("200") - trial.count("402"),
                trial.units_used_in_usage,
                if trial.exact() { "exact" } else { "NOT EXACT" }
            );
        }
    }

    fn print_recalls(&self) {
        let args = self.args;
        println!(
            "\nrecall: gateway A closed loop on {} connections (holds leases), gateway B at {} requests/s (per request), one customer with quota N = {}:",
            args.connections, args.recall_slow_rate, args.recall_quota
        );
        for (index, trial) in self.recalls.iter().enumerate() {
            let (b_before, b_after) = trial.slow_gateway_latency();
            println!(
                "  trial {}: admitted {} of N = {} (A {}, B {}), usage counted {}: {}{}",
                index + 1,
                trial.admitted(None),
                trial.quota,
                trial.admitted(Some(0)),
                trial.admitted(Some(1)),
                trial.units_used_in_usage,
                if trial.exact() { "exact" } else { "NOT EXACT" },
                if trial.limit_reached {
                    " (time limit passed)"
                } else {
                    ""
                }
            );
            match trial.first_recall_us {
                Some((after, by)) => println!(
                    "    first recall between {} and {}; N-th admission at {}: {}",
                    millis(Some(after)),
                    millis(Some(by)),
                    millis(trial.nth_admission_us()),
                    match trial.window_us() {
                        Some((_, at_most)) if at_most < 0.0 =>
                            "the first recall came after the N-th admission".to_owned(),
                        Some((at_least, at_most)) => format!(
                            "from the first recall to the N-th admission at most {} (at least {})",
                            millis(Some(at_most)),
                            millis(Some(at_least.max(0.0)))
                        ),
                        None => "fewer than N admitted".to_owned(),
                    }
                ),
                None => println!(
                    "    no recall happened (usage's recall counter did not rise); N-th admission at {}",
                    millis(trial.nth_admission_us())
                ),
            }
            println!(
                "    waited (sent from the first recall on, latency above max(5 ms, 2 × the gateway's p99 before it)): A {} (above {}), B {} (above {}); leases recalled {}, recalls received by A {}",
                trial.waited(0),
                millis(Some(trial.waited_threshold_us(0))),
                trial.waited(1),
                millis(Some(trial.waited_threshold_us(1))),
                trial.usage_recalls,
                trial.gateways[0].recalled
            );
            println!(
                "    B: {} requests, latency p50 before the recall {}, max from it on {}; A admitted {:.0} from leases, {:.0} per request; 402s answered before the N-th admission {} (B {}), the first 402 at {}",
                trial
                    .answers
                    .iter()
                    .filter(|answer| answer.gateway == 1)
                    .count(),
                millis(Some(b_before).filter(|us| !us.is_nan())),
                millis(Some(b_after).filter(|us| !us.is_nan())),
                trial.gateways[0].via_lease,
                trial.gateways[0].via_usage,
                trial.refusals_before_nth(),
                trial
                    .early_refusals()
                    .filter(|answer| answer.gateway == 1)
                    .count(),
                millis(trial.first_refusal_us())
            );
        }
        let windows = median(
            self.recalls
                .iter()
                .filter_map(|trial| Some(trial.window_us()?.1)),
        );
        println!(
            "  median from the first recall to the N-th admission (at most): {}",
            millis(Some(windows).filter(|us| !us.is_nan()))
        );
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
        let modes: serde_json::Map<String, Value> = self
            .modes
            .iter()
            .map(|mode| {
                (
                    mode.mode.name().to_owned(),
                    json!({
                        "saturation": {
                            "admitted": throughput(&mode.admitted),
                            "quota_exhausted_402": throughput(&mode.quota_402),
                            "many_keys_cold": throughput(&mode.cold),
                            "many_keys_warm": throughput(&mode.warm),
                            "lease_share": mode.lease_share_saturated,
                        },
                        "latency": {
                            "admitted": latency(&mode.latency),
                            "lease_share": mode.lease_share_at_rate,
                        },
                        "cpu_per_admitted_request": {
                            "saturated": cpu_median(&mode.cpu_per_admitted),
                            "at_rate": cpu_median(&mode.cpu_at_rate),
                        },
                        "burst": {
                            "quota": self.args.burst_quota,
                            "requests": self.args.burst_requests,
                            "connections": self.args.burst_connections,
                            "trials": mode.bursts.len(),
                            "exact_trials": mode.exact_bursts(self.args),
                            "runs": mode.bursts,
                        },
                    }),
                )
            })
            .collect();
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
                "pair_quota": self.args.pair_quota,
                "pair_requests": self.args.pair_requests,
                "recall_quota": self.args.recall_quota,
                "recall_slow_rate": self.args.recall_slow_rate,
                "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            },
            "saturation": {
                "direct": throughput(&self.direct),
                "nginx": throughput(&self.nginx),
            },
            "latency": {
                "direct": latency(&self.latency_direct),
                "nginx": latency(&self.latency_nginx),
            },
            "leases": modes,
            "two_gateways": {
                "total_median_rps": self.pair.total_rps(),
                "runs": self.pair.throughput.iter().map(|runs| json!([
                    {"requests": runs[0].requests, "seconds": runs[0].seconds, "rps": runs[0].per_second()},
                    {"requests": runs[1].requests, "seconds": runs[1].seconds, "rps": runs[1].per_second()},
                ])).collect::<Vec<_>>(),
                "lease_share": self.pair.lease_share,
                "exactness": self.pair.trials.iter().map(ExactnessTrial::to_json).collect::<Vec<_>>(),
            },
            "recall": self.recalls.iter().map(RecallTrial::to_json).collect::<Vec<_>>(),
            "targets": self.targets().iter().map(|target| json!({
                "name": target.name,
                "modes": self.modes.iter().map(|mode| mode.mode.name()).collect::<Vec<_>>(),
                "measured": target.measured,
                "goal": target.goal,
                "met": target.met,
            })).collect::<Vec<_>>(),
            "failed_checks": self.failed_checks(),
            "unexpected_answers": unexpected(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_the_samples_whose_labels_match() {
        let text = "# HELP paygate_gateway_admissions_total Admissions.\n\
                    # TYPE paygate_gateway_admissions_total counter\n\
                    paygate_gateway_admissions_total{via=\"lease\"} 90\n\
                    paygate_gateway_admissions_total{via=\"usage\"} 10\n\
                    paygate_gateway_admissions_total_other{via=\"lease\"} 5\n\
                    paygate_usage_leases_recalled_total 3\n";
        let via = |via| metric_sum(text, "paygate_gateway_admissions_total", &[("via", via)]);
        assert_eq!(via("lease"), 90.0);
        assert_eq!(via("usage"), 10.0);
        assert_eq!(
            metric_sum(text, "paygate_gateway_admissions_total", &[]),
            100.0
        );
        assert_eq!(
            metric_sum(text, "paygate_usage_leases_recalled_total", &[]),
            3.0
        );
        assert_eq!(metric_sum(text, "paygate_absent_total", &[]), 0.0);
    }

    fn answer(gateway: usize, sent_ms: f64, latency_ms: f64, status: u16) -> Answered {
        Answered {
            gateway,
            sent_us: sent_ms * 1e3,
            answered_us: (sent_ms + latency_ms) * 1e3,
            status,
        }
    }

    #[test]
    fn a_recall_trial_times_the_first_recall_to_the_nth_admission_and_counts_who_waited() {
        let mut answers = vec![
            // Before the recall: A at 1 ms, B at 2 ms.
            answer(0, 0.0, 1.0, 200),
            answer(0, 1.0, 1.0, 200),
            answer(1, 0.0, 2.0, 200),
            // From the recall (seen between 10 and 12 ms) on: A waits 80 ms, B 60 ms, one A fast.
            answer(0, 11.0, 80.0, 200),
            answer(1, 11.0, 60.0, 200),
            answer(0, 11.5, 1.0, 200),
            // The quota (6) is gone: refusals.
            answer(0, 95.0, 1.0, 402),
            answer(1, 100.0, 1.0, 402),
        ];
        answers.sort_by(|a, b| a.answered_us.total_cmp(&b.answered_us));
        let trial = RecallTrial {
            quota: 6,
            answers,
            first_recall_us: Some((10_000.0, 12_000.0)),
            usage_recalls: 1.0,
            gateways: [Admissions::default(); 2],
            limit_reached: false,
            units_used_in_usage: 6,
        };
        assert_eq!(trial.admitted(None), 6);
        assert_eq!(trial.nth_admission_us(), Some(91_000.0));
        assert_eq!(trial.window_us(), Some((79_000.0, 81_000.0)));
        assert_eq!(trial.waited(0), 1);
        assert_eq!(trial.waited(1), 1);
        assert_eq!(trial.refusals_before_nth(), 0);
        assert_eq!(trial.slow_gateway_latency(), (2_000.0, 60_000.0));
        assert!(trial.exact());

        let short = RecallTrial {
            units_used_in_usage: 7,
            ..trial
        };
        assert!(!short.exact(), "usage disagreeing is a failed check");
    }
}
