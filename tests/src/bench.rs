//! What the benchmark programs (`paygate-bench`, `paygate-faults`) share: paygate's services as separate
//! processes on free ports, PostgreSQL and Redis that can be killed and started again on the same port and
//! data, setup through the admin API, percentiles and the results file.
//!
//! Ports: a port picked by binding port 0 can be taken by another process before the service binds it, so
//! a start counts only when the port is held by the process we started (its own socket, found through
//! `/proc`), and a start whose process exits first is retried on other ports. (Letting the children bind
//! port 0 themselves would need them to report the port they got; paygate's services log the address
//! they were given, and PostgreSQL, Redis and nginx do not report one either.) A restart after a kill
//! must use the old port, since the rest of the stack points at it: when another process holds that port
//! it fails with [`StartError::PortTaken`], naming the port and its holder.

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use proto::{
    billing::v1::{
        self as billing_pb, CreateSubscriptionRequest, IssueApiKeyRequest,
        billing_admin_client::BillingAdminClient, entitlements_client::EntitlementsClient,
    },
    usage::v1::{self as usage_pb, usage_client::UsageClient},
};
use serde_json::Value;
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{
    BearerToken, customer_request, plan_request,
    postgres::{Binaries, RunAs, ensure_template},
};

/// The admin token the benchmarks' billing requires.
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
/// The service token the benchmarks' services require and send.
pub const SERVICE_TOKEN: &str = "bench-service-token-0123456789";
/// How long a process may take to start listening (a debug build on a busy machine is slow).
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a process may take to stop after SIGTERM before it gets SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// How many starts on fresh ports are tried before giving up.
pub const START_ATTEMPTS: usize = 5;
/// How long a port must stay held by another process before a restart on it gives up: a port picker
/// elsewhere may hold it for a moment, a squatter holds it for good.
const TAKEN_GRACE: Duration = Duration::from_secs(2);

// ----- processes -----

/// Why a process did not come to listen on its port.
#[derive(Debug)]
pub enum StartError {
    /// Another process (one we did not start) holds the port, so ours could not bind it.
    PortTaken {
        name: String,
        port: u16,
        holder: String,
    },
    /// The process exited, or did not listen or answer in time, for another reason.
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PortTaken { name, port, holder } => write!(
                formatter,
                "`{name}` cannot listen on port {port}: {holder} holds it"
            ),
            Self::Failed(reason) => formatter.write_str(reason),
        }
    }
}

impl From<String> for StartError {
    fn from(reason: String) -> Self {
        Self::Failed(reason)
    }
}

/// A child process, stopped (SIGTERM, then SIGKILL after a while) when dropped.
pub struct Process {
    name: String,
    child: Option<Child>,
}

impl Process {
    /// Starts `command` (stdin closed) as `name`.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start `{name}`: {error}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// Returns the process id (0 once it has been killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the process with SIGKILL, without warning, and reaps it.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Returns why the process ended, or `None` while it runs.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(format!("`{}` exited ({status})", self.name)),
            Err(error) => Some(format!("`{}` cannot be waited for: {error}", self.name)),
        }
    }

    /// Waits until the process holds every socket listening on `127.0.0.1:port`. Fails with
    /// [`StartError::PortTaken`] when another process listens on the port too (it shares the port through
    /// `SO_REUSEPORT`, or ours exited because it could not bind it), and with [`StartError::Failed`] when
    /// ours exits otherwise or takes longer than a minute.
    pub async fn wait_until_listening(&mut self, port: u16) -> Result<(), StartError> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let exited = self.exited();
            let sockets = listening_sockets(port);
            let (ours, theirs): (Vec<_>, Vec<_>) = sockets
                .into_iter()
                .partition(|socket| holds_any(self.pid(), std::slice::from_ref(socket)));
            if exited.is_some() || !ours.is_empty() {
                if !theirs.is_empty() {
                    return Err(StartError::PortTaken {
                        name: self.name.clone(),
                        port,
                        holder: holder_of(&theirs),
                    });
                }
                return match exited {
                    Some(exited) => Err(StartError::Failed(exited)),
                    None => Ok(()),
                };
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "`{}` did not listen on port {port}",
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_LIMIT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("`{}` did not stop on SIGTERM; killing it", self.name);
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Returns a port that was free a moment ago (see the module's note on ports).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// Returns the inodes (`socket:[N]`) of the sockets listening on `127.0.0.1:port`, or on `port` at an
/// address that covers it (`0.0.0.0`, `::`, `::ffff:127.0.0.1`): any of them keeps another process from
/// binding `127.0.0.1:port` (Linux `/proc`).
fn listening_sockets(port: u16) -> Vec<String> {
    let addresses = [
        "0100007F",
        "00000000",
        "00000000000000000000000000000000",
        "0000000000000000FFFF00000100007F",
    ];
    let locals: Vec<String> = addresses
        .iter()
        .map(|address| format!("{address}:{port:04X}"))
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // local_address is field 1, st field 3 (0A: LISTEN), inode field 9.
                    (fields
                        .get(1)
                        .is_some_and(|local| locals.iter().any(|own| own == local))
                        && fields.get(3) == Some(&"0A"))
                    .then(|| format!("socket:[{}]", fields.get(9).copied().unwrap_or_default()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Returns whether process `pid` holds one of `sockets`.
fn holds_any(pid: u32, sockets: &[String]) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .any(|link| {
            sockets
                .iter()
                .any(|socket| link.as_os_str() == socket.as_str())
        })
}

/// Describes the process holding one of `sockets` (`process 1234 (`nginx`)`), or says it cannot be seen
/// when its `/proc` entry is not readable.
fn holder_of(sockets: &[String]) -> String {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| holds_any(pid, sockets))
        .map_or_else(
            || "a process we cannot see".to_owned(),
            |pid| {
                let command =
                    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                format!("process {pid} (`{}`)", command.trim())
            },
        )
}

/// How to start one of paygate's services (`billing`, `usage`, `gateway`) as a process of its own.
#[derive(Clone)]
pub struct ServiceSpec {
    binary: PathBuf,
    name: &'static str,
    listen_var: &'static str,
    metrics_var: &'static str,
    env: Vec<(String, String)>,
    worker_threads: Option<usize>,
}

/// A service process, the port it listens on and the port it serves `/metrics` on.
pub struct RunningService {
    pub process: Process,
    pub port: u16,
    pub metrics_port: u16,
}

impl ServiceSpec {
    /// Describes `bin_dir/name`, which listens on the address in `<listen_var>` and serves metrics on the
    /// one in `<metrics_var>`.
    pub fn new(
        bin_dir: &Path,
        name: &'static str,
        listen_var: &'static str,
        metrics_var: &'static str,
    ) -> Self {
        Self {
            binary: bin_dir.join(name),
            name,
            listen_var,
            metrics_var,
            env: Vec::new(),
            worker_threads: None,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// Sets `TOKIO_WORKER_THREADS` (unset: one per core).
    pub fn worker_threads(mut self, threads: Option<usize>) -> Self {
        self.worker_threads = threads;
        self
    }

    /// Starts the service on a free port, retrying on another port when the one picked was taken.
    pub async fn start(&self) -> RunningService {
        self.start_picking(free_port).await
    }

    /// Starts the service on ports from `pick_port` (one for its API, one for its metrics per attempt),
    /// retrying with new ones while a start fails, at most five times.
    pub async fn start_picking(&self, mut pick_port: impl FnMut() -> u16) -> RunningService {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let (port, metrics_port) = (pick_port(), pick_port());
            match self.start_on_ports(port, metrics_port).await {
                Ok(process) => {
                    return RunningService {
                        process,
                        port,
                        metrics_port,
                    };
                }
                Err(error) => last_error = Some(error),
            }
        }
        panic!(
            "{} failed to start after {START_ATTEMPTS} attempts: {}",
            self.name,
            last_error.expect("an attempt")
        );
    }

    /// Starts the service on `port` (again, after a kill) with metrics on a free port; fails when it
    /// exits or never listens, e.g. because another process took the port meanwhile.
    pub async fn start_on(&self, port: u16) -> Result<Process, StartError> {
        self.start_on_ports(port, free_port()).await
    }

    async fn start_on_ports(&self, port: u16, metrics_port: u16) -> Result<Process, StartError> {
        let mut command = Command::new(&self.binary);
        if let Some(threads) = self.worker_threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        command
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .env(self.listen_var, format!("127.0.0.1:{port}"))
            .env(self.metrics_var, format!("127.0.0.1:{metrics_port}"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let mut process = Process::spawn(self.name, command);
        process.wait_until_listening(port).await?;
        // The services bind their metrics port before their API port, so this only fails when another
        // process shares the metrics port; the benchmark reads figures from it, so that start is retried.
        process.wait_until_listening(metrics_port).await?;
        Ok(process)
    }
}

/// Describes billing as the benchmarks run it, on the PostgreSQL database at `database_url`.
pub fn billing_spec(bin_dir: &Path, database_url: &str) -> ServiceSpec {
    ServiceSpec::new(
        bin_dir,
        "billing",
        "BILLING_LISTEN_ADDR",
        "BILLING_METRICS_ADDR",
    )
    .env("DATABASE_URL", database_url)
    .env("BILLING_ADMIN_TOKEN", ADMIN_TOKEN)
    .env("PAYGATE_SERVICE_TOKEN", SERVICE_TOKEN)
}

/// Describes usage as the benchmarks run it, on Redis at `redis_url`, reporting to billing on
/// `billing_port`.
pub fn usage_spec(bin_dir: &Path, redis_url: &str, billing_port: u16) -> ServiceSpec {
    ServiceSpec::new(bin_dir, "usage", "USAGE_LISTEN_ADDR", "USAGE_METRICS_ADDR")
        .env("REDIS_URL", redis_url)
        .env("BILLING_URL", format!("http://127.0.0.1:{billing_port}"))
        .env("PAYGATE_SERVICE_TOKEN", SERVICE_TOKEN)
}

/// Describes the gateway as the benchmarks run it: one route, `/`, price 1, to `upstream` (`host:port`),
/// asking billing and usage on their ports within `deadline_ms`.
pub fn gateway_spec(
    bin_dir: &Path,
    work: &Path,
    upstream: &str,
    deadline_ms: u64,
    billing_port: u16,
    usage_port: u16,
) -> ServiceSpec {
    let routes = work.join("routes.toml");
    std::fs::write(
        &routes,
        format!("[[routes]]\nprefix = \"/\"\nupstream = \"http://{upstream}\"\nprice = 1\n"),
    )
    .expect("the routes file");
    ServiceSpec::new(
        bin_dir,
        "gateway",
        "GATEWAY_LISTEN_ADDR",
        "GATEWAY_METRICS_ADDR",
    )
    .env("GATEWAY_CONFIG", routes.display().to_string())
    .env("GATEWAY_BACKEND_DEADLINE_MS", deadline_ms.to_string())
    .env("BILLING_URL", format!("http://127.0.0.1:{billing_port}"))
    .env("USAGE_URL", format!("http://127.0.0.1:{usage_port}"))
    .env("PAYGATE_SERVICE_TOKEN", SERVICE_TOKEN)
}

/// Retries `start` until it succeeds or `limit` has passed, for a service started again on its old port
/// after a kill (a socket of the killed process may still hold it for a moment). Gives up early with
/// [`StartError::PortTaken`] once another process has held the port for two seconds: the experiment
/// needs that port, and waiting will not free it.
pub async fn restart_within<T, F, Fut>(limit: Duration, mut start: F) -> Result<T, StartError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StartError>>,
{
    let mut attempts = RestartAttempts::within(limit);
    loop {
        match start().await {
            Ok(started) => return Ok(started),
            Err(error) if attempts.give_up_after(&error) => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// When to stop starting something again on its old port.
struct RestartAttempts {
    deadline: Instant,
    taken_since: Option<Instant>,
}

impl RestartAttempts {
    fn within(limit: Duration) -> Self {
        Self {
            deadline: Instant::now() + limit,
            taken_since: None,
        }
    }

    /// Returns whether the attempt that failed with `error` should be the last.
    fn give_up_after(&mut self, error: &StartError) -> bool {
        if matches!(error, StartError::PortTaken { .. }) {
            let since = *self.taken_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= TAKEN_GRACE {
                return true;
            }
        } else {
            self.taken_since = None;
        }
        Instant::now() > self.deadline
    }
}

// ----- PostgreSQL and Redis that survive a kill -9 -----

/// A PostgreSQL cluster of the benchmark's own (copied from the harness's `initdb` template) that can be
/// killed and started again on the same port and data directory. Its log goes to `log`.
pub struct Postgres {
    pub port: u16,
    pub log: PathBuf,
    dir: PathBuf,
    settings: Vec<String>,
    process: Option<Process>,
}

impl Postgres {
    /// Starts a cluster under `work` with extra `-c` `settings` (`name=value`), and waits until it answers.
    pub async fn start(work: &Path, settings: &[&str]) -> Self {
        let binaries = Binaries::find();
        let user = RunAs::detect();
        let dir = work.join("postgres");
        {
            let (template, _shared_lock) = ensure_template(&binaries, &user);
            let copied = Command::new("cp")
                .arg("-a")
                .arg(&template)
                .arg(&dir)
                .status()
                .expect("cp");
            assert!(copied.success(), "failed to copy the PostgreSQL template");
        }
        let mut cluster = Self {
            port: 0,
            log: work.join("postgres.log"),
            dir,
            settings: settings.iter().map(|&setting| setting.to_owned()).collect(),
            process: None,
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            cluster.port = free_port();
            match cluster.start_process(&binaries, &user).await {
                Ok(()) => return cluster,
                Err(error) => last_error = Some(error),
            }
        }
        panic!(
            "PostgreSQL failed to start after {START_ATTEMPTS} attempts: {}",
            last_error.expect("an attempt")
        );
    }

    /// Returns the URL of database `postgres` as user `postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    async fn start_process(&mut self, binaries: &Binaries, user: &RunAs) -> Result<(), StartError> {
        let mut command = Command::new(&binaries.postgres);
        // Started directly under the postgres user (not through runuser), so the child is the postmaster.
        if let RunAs::Postgres { uid, gid } = user {
            std::os::unix::process::CommandExt::uid(&mut command, *uid);
            std::os::unix::process::CommandExt::gid(&mut command, *gid);
        }
        command
            .arg("-D")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            // fsync off loses nothing to a killed process (the kernel keeps its writes); commits stay
            // synchronous, so a kill loses no acknowledged transaction.
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|setting| ["-c", setting]))
            .stdout(Stdio::null())
            .stderr(append_to(&self.log));
        let mut process = Process::spawn("postgres", command);
        process.wait_until_listening(self.port).await?;
        self.process = Some(process);
        Ok(self.wait_until_answering().await?)
    }

    /// Waits until a query succeeds (after a crash, PostgreSQL listens before its recovery is done).
    pub async fn wait_until_answering(&self) -> Result<(), String> {
        use sqlx::Connection;
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let attempt = async {
                let mut connection = sqlx::PgConnection::connect(&self.url()).await?;
                sqlx::query("SELECT 1").execute(&mut connection).await?;
                connection.close().await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) if Instant::now() > deadline => {
                    return Err(format!("PostgreSQL does not answer: {error}"));
                }
                Err(_) if Instant::now() > deadline => {
                    return Err("PostgreSQL does not answer in time".into());
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Kills the postmaster and every process it started with SIGKILL, as a crash of its host would.
    pub fn kill_hard(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        let postmaster = process.pid();
        let mut pids = children_of(postmaster);
        pids.push(postmaster);
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(pids.iter().map(u32::to_string))
            .status();
        process.kill_hard();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the cluster again on its port and data (crash recovery included); fails after `limit`, or
    /// sooner when another process holds the port (see [`restart_within`]).
    pub async fn restart(&mut self, limit: Duration) -> Result<(), StartError> {
        let (binaries, user) = (Binaries::find(), RunAs::detect());
        let mut attempts = RestartAttempts::within(limit);
        loop {
            match self.start_process(&binaries, &user).await {
                Ok(()) => return Ok(()),
                Err(error) if attempts.give_up_after(&error) => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM is PostgreSQL's "smart" shutdown, which waits for clients; the benchmark is done with it.
        if let Some(process) = &self.process {
            let _ = Command::new("kill")
                .args(["-INT", &process.pid().to_string()])
                .status();
        }
        self.process = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append_to(path: &Path) -> Stdio {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|error| panic!("failed to open `{}`: {error}", path.display()))
}

/// Returns the ids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent id is the second field after the parenthesised command name.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// A Redis server of the benchmark's own (AOF `everysec`, as usage insists) that can be killed and
/// started again on the same port and data.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

impl Redis {
    /// Starts a server under `work` and waits until it answers.
    pub async fn start(work: &Path) -> Self {
        let dir = work.join("redis");
        std::fs::create_dir_all(&dir).expect("Redis's directory");
        let mut server = Self {
            port: 0,
            dir,
            process: None,
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.start_process().await {
                Ok(()) => return server,
                Err(error) => last_error = Some(error),
            }
        }
        panic!(
            "redis failed to start after {START_ATTEMPTS} attempts: {}",
            last_error.expect("an attempt")
        );
    }

    /// Returns its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Returns the server's process id.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    async fn start_process(&mut self) -> Result<(), StartError> {
        let mut command = Command::new(crate::redis_server::find_binary());
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--daemonize", "no", "--logfile", ""])
            .args(crate::redis_server::DURABLE)
            .stdout(append_to(&self.dir.join("redis.log")));
        let mut process = Process::spawn("redis-server", command);
        process.wait_until_listening(self.port).await?;
        self.process = Some(process);
        // Listening comes before the AOF is loaded; a PING answers only after.
        let client = redis::Client::open(self.url()).map_err(|error| error.to_string())?;
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let ping = async {
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(StartError::Failed("redis does not answer".into()));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill_hard(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill_hard();
        }
    }

    /// Starts the server again on its port and data; fails after `limit`, or sooner when another process
    /// holds the port (see [`restart_within`]).
    pub async fn restart(&mut self, limit: Duration) -> Result<(), StartError> {
        let mut attempts = RestartAttempts::within(limit);
        loop {
            match self.start_process().await {
                Ok(()) => return Ok(()),
                Err(error) if attempts.give_up_after(&error) => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.process = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ----- setup through the admin API -----

/// A `BillingAdmin` client carrying the benchmark's admin token.
pub type Admin = BillingAdminClient<InterceptedService<Channel, BearerToken>>;
/// A `Usage` client carrying the benchmark's service token.
pub type Usage = UsageClient<InterceptedService<Channel, BearerToken>>;
/// An `Entitlements` client carrying the benchmark's service token.
pub type Entitlements = EntitlementsClient<InterceptedService<Channel, BearerToken>>;

/// Keys per customer of [`many_keys`].
pub const KEYS_PER_CUSTOMER: usize = 10;

async fn channel(port: u16, what: &str) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a URL")
        .connect()
        .await
        .unwrap_or_else(|error| panic!("failed to connect to {what}: {error}"))
}

/// Returns an admin client of the billing on `port`.
pub async fn admin_client(port: u16) -> Admin {
    BillingAdminClient::with_interceptor(
        channel(port, "billing").await,
        BearerToken::new(Some(ADMIN_TOKEN)),
    )
}

/// Returns a client of the usage on `port`.
pub async fn usage_client(port: u16) -> Usage {
    UsageClient::with_interceptor(
        channel(port, "usage").await,
        BearerToken::new(Some(SERVICE_TOKEN)),
    )
}

/// Returns an entitlements client of the billing on `port`.
pub async fn entitlements_client(port: u16) -> Entitlements {
    EntitlementsClient::with_interceptor(
        channel(port, "billing").await,
        BearerToken::new(Some(SERVICE_TOKEN)),
    )
}

/// Creates a free plan (price 0) of `included_units` units with overage blocked; returns its id.
pub async fn free_plan(admin: &Admin, code: &str, included_units: i64) -> String {
    admin
        .clone()
        .create_plan(billing_pb::CreatePlanRequest {
            price_micros: 0,
            included_units,
            features: Vec::new(),
            ..plan_request(code)
        })
        .await
        .expect("a plan")
        .into_inner()
        .id
}

/// Returns the subscription of a new customer to `plan_id`.
pub async fn subscribed_customer(admin: &Admin, plan_id: &str) -> billing_pb::Subscription {
    let customer = admin
        .clone()
        .create_customer(customer_request(&uuid::Uuid::new_v4().to_string()))
        .await
        .expect("a customer")
        .into_inner();
    admin
        .clone()
        .create_subscription(CreateSubscriptionRequest {
            customer_id: customer.id,
            plan_id: plan_id.to_owned(),
        })
        .await
        .expect("a subscription")
        .into_inner()
}

/// Issues a key to `customer_id`; returns its secret.
pub async fn issue_key(admin: &Admin, customer_id: &str) -> String {
    admin
        .clone()
        .issue_api_key(IssueApiKeyRequest {
            customer_id: customer_id.to_owned(),
            name: "bench".into(),
        })
        .await
        .expect("a key")
        .into_inner()
        .secret
}

/// Returns a key of a new customer on a new free plan of `included_units` units (overage blocked), and
/// the customer's subscription.
pub async fn key_with_quota(
    admin: &Admin,
    code: &str,
    included_units: i64,
) -> (String, billing_pb::Subscription) {
    let plan_id = free_plan(admin, code, included_units).await;
    let subscription = subscribed_customer(admin, &plan_id).await;
    (
        issue_key(admin, &subscription.customer_id).await,
        subscription,
    )
}

/// Issues `count` keys to one customer, 32 at a time.
pub async fn keys_of(admin: &Admin, customer_id: &str, count: usize) -> Vec<String> {
    let permits = Arc::new(Semaphore::new(32));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let (admin, customer_id, permits) =
            (admin.clone(), customer_id.to_owned(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("open semaphore");
            issue_key(&admin, &customer_id).await
        });
    }
    tasks.join_all().await
}

/// Issues `count` keys, ten per customer, all on one plan with room for every request.
pub async fn many_keys(admin: &Admin, count: usize) -> Vec<String> {
    let plan_id = Arc::new(free_plan(admin, "bench-many", 1_000_000_000_000).await);
    let permits = Arc::new(Semaphore::new(32));
    let mut tasks = JoinSet::new();
    for first in (0..count).step_by(KEYS_PER_CUSTOMER) {
        let keys = KEYS_PER_CUSTOMER.min(count - first);
        let (admin, plan_id, permits) = (admin.clone(), plan_id.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("open semaphore");
            let subscription = subscribed_customer(&admin, &plan_id).await;
            let mut issued = Vec::with_capacity(keys);
            for _ in 0..keys {
                issued.push(issue_key(&admin, &subscription.customer_id).await);
            }
            issued
        });
    }
    let mut keys = Vec::with_capacity(count);
    while let Some(issued) = tasks.join_next().await {
        keys.extend(issued.expect("a key-issuing task"));
    }
    keys
}

/// Returns usage's figures for the subscription's current period, or `None` when usage does not answer.
pub async fn usage_of(
    usage: &Usage,
    subscription: &billing_pb::Subscription,
) -> Option<usage_pb::GetUsageResponse> {
    let mut request = tonic::Request::new(usage_pb::GetUsageRequest {
        customer_id: subscription.customer_id.clone(),
        subscription_id: subscription.id.clone(),
        period_start: subscription.current_period_start,
    });
    request.set_timeout(Duration::from_secs(5));
    usage
        .clone()
        .get_usage(request)
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Returns the units usage has counted in the subscription's current period (-1 when usage does not
/// answer).
pub async fn units_used(usage: &Usage, subscription: &billing_pb::Subscription) -> i64 {
    usage_of(usage, subscription)
        .await
        .map_or(-1, |usage| usage.units_used)
}

// ----- figures and results -----

/// Returns the `quantile` (0..=1) of `sorted` values by the nearest-rank method; NaN when empty.
pub fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Writes `report` to `<dir>/<time>-<label>.json` and returns the file's path.
pub fn write_results(dir: &Path, label: &str, report: &Value) -> PathBuf {
    std::fs::create_dir_all(dir).expect("the results directory");
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a formattable instant")
        .replace(':', "");
    let file = dir.join(format!("{stamp}-{label}.json"));
    std::fs::write(
        &file,
        serde_json::to_string_pretty(report).expect("JSON") + "\n",
    )
    .expect("the results file");
    file
}

/// Returns a fresh, empty work directory under the temp dir named after `program`.
pub fn work_dir(program: &str) -> PathBuf {
    let work = std::env::temp_dir().join(format!("{program}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work).expect("a work directory");
    work
}
