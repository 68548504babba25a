//! Throwaway Redis servers: one per test process with the persistence usage insists on (AOF, `everysec`),
//! more on request with other settings, and servers of a test's own that it can kill and start again on
//! the same port with the same data (`RestartableRedis`).
//!
//! Each runs under a supervising shell (`supervisor`): when the test process exits, however it exits, the
//! shell stops redis and deletes its directory.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use uuid::Uuid;

use crate::supervisor::Supervisor;

const START_ATTEMPTS: usize = 5;
const MISSING_BINARY: &str =
    "redis-server not found: install redis-server (apt-get install redis-server) or set REDIS_URL";
/// What redis prints once it has loaded its data and listens.
const READY: &str = "Ready to accept connections";
/// Redis 7's multi-part append-only file: a directory (`appenddirname`) holding a manifest that lists a
/// base file and incremental files.
const AOF_DIR: &str = "appendonlydir";
const AOF_MANIFEST: &str = "appendonly.aof.manifest";

/// A running Redis server at `127.0.0.1:port`. It stops when dropped, or when the test process exits.
pub(crate) struct Server {
    pub(crate) port: u16,
    _supervisor: Supervisor,
}

/// Returns this process's Redis server, starting it on first use. Blocks; panics with one line when
/// `redis-server` is missing or cannot start.
pub(crate) fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start_with(DURABLE))
}

pub(crate) fn find_binary() -> PathBuf {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{MISSING_BINARY}"))
}

/// The settings usage insists on: an append-only file synced every second, and no eviction.
pub const DURABLE: &[&str] = &[
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--maxmemory-policy",
    "noeviction",
];

/// Starts another Redis server with `settings` (e.g. persistence off); it stops when the returned value
/// is dropped or the process exits.
pub(crate) fn start_with(settings: &[&str]) -> Server {
    let (port, _dir, supervisor) = start_attempts(settings, Listen::Plain);
    Server {
        port,
        _supervisor: supervisor,
    }
}

/// What a server listens with on its port.
#[derive(Clone, Copy)]
enum Listen {
    Plain,
    /// TLS only: the plaintext port is off.
    Tls,
}

/// Starts redis on a free port, retrying when the port was taken meanwhile; returns the port, the data
/// directory and the running server.
fn start_attempts(settings: &[&str], listen: Listen) -> (u16, PathBuf, Supervisor) {
    let binary = find_binary();
    let mut last_error = String::new();
    for _ in 0..START_ATTEMPTS {
        let dir = std::env::temp_dir().join(format!("paygate-redis-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|error| panic!("failed to create `{}`: {error}", dir.display()));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .unwrap_or_else(|error| panic!("failed to find a free port: {error}"));
        let mut command = Command::new(&binary);
        let port_settings = match listen {
            Listen::Plain => ["--port".to_owned(), port.to_string()],
            Listen::Tls => ["--port".to_owned(), "0".to_owned()],
        };
        command
            .args(port_settings)
            .args(match listen {
                Listen::Plain => vec![],
                Listen::Tls => vec!["--tls-port".to_owned(), port.to_string()],
            })
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .arg("--pidfile")
            .arg(dir.join("redis.pid"))
            .args(["--save", "", "--daemonize", "no", "--logfile", ""])
            .args(settings);
        let mut supervisor = Supervisor::spawn(&command, &dir, None, &dir.join("redis.pid"));
        match supervisor.start_blocking(READY) {
            Ok(()) => return (port, dir, supervisor),
            Err(error) => {
                supervisor.stop_and_remove_blocking();
                last_error = error;
            }
        }
    }
    panic!("redis failed to start after {START_ATTEMPTS} attempts: {last_error}");
}

/// A Redis server of a test's own that the test can kill or stop and start again on the same port, with
/// the same data directory and settings, to play an outage or a host crash. Its directory is deleted when
/// it is dropped or the test process exits.
pub struct RestartableRedis {
    port: u16,
    dir: PathBuf,
    running: bool,
    supervisor: Supervisor,
}

/// Starts a Redis server of the test's own with usage's settings (`DURABLE`: AOF on, `appendfsync
/// everysec`, `noeviction`) followed by `overrides` (a later setting wins, e.g. `["--appendfsync",
/// "always"]`). Panics with one line when `redis-server` is missing or cannot start.
pub async fn spawn_restartable_redis(overrides: &[&str]) -> RestartableRedis {
    let settings: Vec<String> = DURABLE
        .iter()
        .chain(overrides)
        .map(|setting| (*setting).to_owned())
        .collect();
    let (port, dir, supervisor) = crate::run_blocking("starting redis", move || {
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        start_attempts(&settings, Listen::Plain)
    })
    .await;
    let redis = RestartableRedis {
        port,
        dir,
        running: true,
        supervisor,
    };
    wait_until_serving(&redis.url(), &redis.dir).await;
    redis
}

impl RestartableRedis {
    /// Returns its URL, `redis://127.0.0.1:<port>`; the same across restarts.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Returns its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills redis with SIGKILL and waits until it has exited: no shutdown work, but what it wrote to
    /// the append-only file is in the page cache and survives (unlike a host crash; see
    /// `truncate_aof_to`).
    pub async fn kill(&mut self) {
        self.supervisor.signal("KILL").await;
        self.running = false;
    }

    /// Stops redis with SIGTERM (it syncs its append-only file first) and waits until it has exited.
    pub async fn stop(&mut self) {
        self.supervisor.signal("TERM").await;
        self.running = false;
    }

    /// Starts redis again on the same port with the same data and settings, and waits until it answers
    /// PING (not LOADING). Panics when it is running or cannot start (for example: another process took
    /// the port meanwhile).
    pub async fn start(&mut self) {
        assert!(!self.running, "redis is already running");
        self.supervisor.start(READY).await;
        self.running = true;
        wait_until_serving(&self.url(), &self.dir).await;
    }

    /// Returns the length in bytes of the newest incremental append-only file, where the latest writes
    /// are (Redis 7's multi-part AOF, found through the manifest in `appendonlydir/`).
    pub fn aof_len(&self) -> u64 {
        let path = self.newest_incremental_aof();
        std::fs::metadata(&path)
            .unwrap_or_else(|error| panic!("failed to read `{}`: {error}", path.display()))
            .len()
    }

    /// Waits until the newest incremental append-only file is longer than `len` bytes and returns its
    /// length. Redis may hold back writing its AOF buffer (under `everysec`, while a background fsync
    /// runs), so a test that cuts the file at a command's end reads the length through this.
    pub async fn wait_until_aof_longer_than(&self, len: u64) -> u64 {
        let patience = Duration::from_secs(10);
        let started = Instant::now();
        loop {
            let now = self.aof_len();
            if now > len {
                return now;
            }
            assert!(
                started.elapsed() < patience,
                "the append-only file stayed at {now} bytes for {patience:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Cuts the newest incremental append-only file back to `len` bytes, as a host crash that lost the
    /// writes after that point would. Redis must be stopped; on `start` it loads what is left (a command
    /// cut in half is dropped under `aof-load-truncated yes`, the default).
    pub fn truncate_aof_to(&self, len: u64) {
        assert!(
            !self.running,
            "kill or stop redis before cutting its append-only file"
        );
        let path = self.newest_incremental_aof();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_len(len))
            .unwrap_or_else(|error| panic!("failed to truncate `{}`: {error}", path.display()));
    }

    fn newest_incremental_aof(&self) -> PathBuf {
        let dir = self.dir.join(AOF_DIR);
        let manifest = std::fs::read_to_string(dir.join(AOF_MANIFEST)).unwrap_or_else(|error| {
            panic!("failed to read the AOF manifest (is appendonly on?): {error}")
        });
        newest_incremental_file(&manifest)
            .map(|name| dir.join(name))
            .unwrap_or_else(|| panic!("the AOF manifest lists no incremental file: {manifest}"))
    }
}

/// Returns the name of the last `type i` file of a Redis 7 AOF manifest (lines such as
/// `file appendonly.aof.1.incr.aof seq 1 type i`).
fn newest_incremental_file(manifest: &str) -> Option<String> {
    manifest
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let value = |key: &str| {
                let at = fields.iter().position(|field| *field == key)?;
                fields.get(at + 1).copied()
            };
            (value("type")? == "i").then(|| value("file").map(str::to_owned))?
        })
        .next_back()
}

/// A Redis server of a test's own that speaks only TLS, with a certificate from a test CA; it stops when
/// dropped, or when the test process exits.
pub struct TlsRedis {
    port: u16,
    _server: Server,
}

/// Starts a Redis server of the test's own with usage's settings (`DURABLE`) that serves only TLS, with a
/// certificate `ca` issues for `localhost` and `127.0.0.1`, and does not ask clients for certificates.
/// Panics with one line when `redis-server` is missing, lacks TLS, or cannot start.
pub async fn spawn_tls_redis(ca: &crate::tls::TestCa) -> TlsRedis {
    let cert = ca.issue("redis", &["localhost", "127.0.0.1"]);
    let settings: Vec<String> = DURABLE
        .iter()
        .map(|setting| (*setting).to_owned())
        .chain([
            "--tls-cert-file".to_owned(),
            path_text(&cert.cert_file),
            "--tls-key-file".to_owned(),
            path_text(&cert.key_file),
            "--tls-ca-cert-file".to_owned(),
            path_text(&ca.cert_file()),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ])
        .collect();
    let (port, _dir, supervisor) = crate::run_blocking("starting redis with TLS", move || {
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        start_attempts(&settings, Listen::Tls)
    })
    .await;
    TlsRedis {
        port,
        _server: Server {
            port,
            _supervisor: supervisor,
        },
    }
}

impl TlsRedis {
    /// Returns its URL, `rediss://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// Returns its port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn path_text(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("`{}` is not UTF-8", path.display()))
        .to_owned()
}

/// Polls PING until redis answers it (a Redis still loading its data answers LOADING).
async fn wait_until_serving(url: &str, dir: &Path) {
    let patience = Duration::from_secs(60);
    let started = Instant::now();
    let client = redis::Client::open(url).expect("a valid redis URL");
    loop {
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        match ping.await {
            Ok(_) => return,
            Err(error) if started.elapsed() > patience => panic!(
                "redis in `{}` did not answer PING within {patience:?}: {error}",
                dir.display()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_incremental_file_is_the_last_of_type_i() {
        let manifest = "file appendonly.aof.1.base.rdb seq 1 type b\n\
                        file appendonly.aof.1.incr.aof seq 1 type i\n\
                        file appendonly.aof.2.incr.aof seq 2 type i\n";

        let newest = newest_incremental_file(manifest);

        assert_eq!(newest.as_deref(), Some("appendonly.aof.2.incr.aof"));
    }
}
