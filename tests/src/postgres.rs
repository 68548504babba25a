//! A throwaway PostgreSQL cluster per test process, copied from an `initdb` template made once per machine.
//!
//! `initdb` takes seconds, so it runs once into a template directory under the temp dir (guarded by a lock
//! file, marked complete when done). Each test process copies the template and starts `postgres` on a free
//! port under a supervising shell (`supervisor`): when the process exits, however it exits, the shell stops
//! postgres and deletes the copy. A test may also start a cluster of its own that it can crash and start
//! again on the same port (`RestartablePostgres`).

use std::{
    fs::{self, File},
    net::TcpListener,
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use uuid::Uuid;

use crate::supervisor::Supervisor;

/// Bump when the template's contents or initdb flags change, so stale templates are not reused.
const TEMPLATE_NAME: &str = "paygate-pg-template-v2";
/// What postgres prints once it has recovered and listens.
const READY: &str = "ready to accept connections";
/// A port picked by binding port 0 can be taken by someone else before postgres binds it; then we retry.
const START_ATTEMPTS: usize = 5;
const MISSING_BINARIES: &str = "PostgreSQL server binaries not found (initdb, postgres): install postgresql-15 or set DATABASE_URL";

/// A running cluster, reachable at `127.0.0.1:port` as user `postgres` without a password. It stops when
/// the test process exits.
pub(crate) struct Cluster {
    pub(crate) port: u16,
    _supervisor: Supervisor,
}

/// Returns this process's cluster, starting it on first use. Blocks; panics with one line when PostgreSQL
/// is missing or cannot start.
pub(crate) fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

fn start_cluster() -> Cluster {
    let (port, supervisor) = start_attempts(&[]);
    Cluster {
        port,
        _supervisor: supervisor,
    }
}

/// Starts a cluster copied from the template on a free port with `settings` (`-c name=value` pairs after
/// ours: the last one wins), retrying when the port was taken meanwhile.
fn start_attempts(settings: &[&str]) -> (u16, Supervisor) {
    let binaries = Binaries::find();
    let user = RunAs::detect();
    let mut last_error = String::new();
    for _ in 0..START_ATTEMPTS {
        // Shared while copying, so no other process rebuilds the template under the copy.
        let (template, _shared_lock) = ensure_template(&binaries, &user);
        match start_postgres(&binaries, &user, &template, settings) {
            Ok(started) => return started,
            Err(error) => last_error = error,
        }
    }
    panic!("PostgreSQL failed to start after {START_ATTEMPTS} attempts: {last_error}");
}

pub(crate) struct Binaries {
    initdb: PathBuf,
    pub(crate) postgres: PathBuf,
}

impl Binaries {
    /// Looks on PATH first, then in Debian's versioned directories, highest version first.
    pub(crate) fn find() -> Self {
        let on_path: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect())
            .unwrap_or_default();
        on_path
            .into_iter()
            .chain(debian_bin_dirs())
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
            .map(|dir| Self {
                initdb: dir.join("initdb"),
                postgres: dir.join("postgres"),
            })
            .unwrap_or_else(|| panic!("{MISSING_BINARIES}"))
    }
}

fn debian_bin_dirs() -> Vec<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// PostgreSQL refuses to run as root, so as root everything runs as the `postgres` system user.
pub(crate) enum RunAs {
    CurrentUser,
    Postgres { uid: u32, gid: u32 },
}

impl RunAs {
    pub(crate) fn detect() -> Self {
        if effective_uid() != Some(0) {
            return Self::CurrentUser;
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.first() == Some(&"postgres"))
            .and_then(|fields| {
                Some(Self::Postgres {
                    uid: fields.get(2)?.parse().ok()?,
                    gid: fields.get(3)?.parse().ok()?,
                })
            })
            .unwrap_or_else(|| {
                panic!("running as root needs a `postgres` system user (install postgresql-15) or set DATABASE_URL")
            })
    }

    fn command(&self, program: &Path) -> Command {
        match self {
            Self::CurrentUser => Command::new(program),
            Self::Postgres { .. } => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(program);
                command
            }
        }
    }

    /// Makes the user postgres runs as the owner of `path`.
    fn give(&self, path: &Path) {
        if let Self::Postgres { uid, gid } = self {
            chown(path, Some(*uid), Some(*gid))
                .unwrap_or_else(|error| panic!("failed to chown `{}`: {error}", path.display()));
        }
    }
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Returns the template's data directory and a shared lock on it, running `initdb` into it first when no
/// complete template exists for these binaries. The exclusive lock makes concurrent test processes wait
/// for one `initdb` instead of racing.
pub(crate) fn ensure_template(binaries: &Binaries, user: &RunAs) -> (PathBuf, File) {
    let root = std::env::temp_dir().join(TEMPLATE_NAME);
    let marker = root.join("complete");
    let data = root.join("data");
    // The marker names the binaries, so a template made by another PostgreSQL version is rebuilt.
    let made_by = fs::canonicalize(&binaries.postgres)
        .unwrap_or_else(|_| binaries.postgres.clone())
        .display()
        .to_string();
    let is_complete = || fs::read_to_string(&marker).ok().as_deref() == Some(made_by.as_str());
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(std::env::temp_dir().join(format!("{TEMPLATE_NAME}.lock")))
        .unwrap_or_else(|error| panic!("failed to open the template lock file: {error}"));
    loop {
        lock.lock_shared()
            .unwrap_or_else(|error| panic!("failed to lock the template: {error}"));
        if is_complete() {
            return (data, lock);
        }
        lock.lock()
            .unwrap_or_else(|error| panic!("failed to lock the template: {error}"));
        if !is_complete() {
            run_initdb(binaries, user, &root, &data);
            fs::write(&marker, &made_by)
                .unwrap_or_else(|error| panic!("failed to mark the template complete: {error}"));
        }
        lock.unlock()
            .unwrap_or_else(|error| panic!("failed to unlock the template: {error}"));
    }
}

fn run_initdb(binaries: &Binaries, user: &RunAs, root: &Path, data: &Path) {
    match fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => panic!(
            "failed to remove a stale template `{}`: {error}",
            root.display()
        ),
    }
    fs::create_dir_all(data)
        .unwrap_or_else(|error| panic!("failed to create `{}`: {error}", data.display()));
    user.give(data);
    // 1 MB WAL segments instead of 16 keep the copy every test process makes small.
    let output = user
        .command(&binaries.initdb)
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        .args(["--locale=C", "--no-instructions", "--wal-segsize=1"])
        .output()
        .unwrap_or_else(|error| panic!("failed to run initdb: {error}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        panic!("initdb failed: {}", stderr.trim().replace('\n', " | "));
    }
}

/// Copies the template, starts postgres on a free port and waits until it accepts connections. `Err` holds
/// postgres's last words when it exited instead (typically: the port was taken meanwhile).
fn start_postgres(
    binaries: &Binaries,
    user: &RunAs,
    template: &Path,
    settings: &[&str],
) -> Result<(u16, Supervisor), String> {
    let dir = std::env::temp_dir().join(format!("paygate-pg-{}", Uuid::new_v4().simple()));
    let port = free_port();

    let mut postgres = user.command(&binaries.postgres);
    postgres
        .arg("-D")
        .arg(&dir)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(&dir)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ])
        .args(["-c", "max_connections=200"])
        .args(settings);
    let mut supervisor =
        Supervisor::spawn(&postgres, &dir, Some(template), &dir.join("postmaster.pid"));
    match supervisor.start_blocking(READY) {
        Ok(()) => Ok((port, supervisor)),
        Err(error) => {
            supervisor.stop_and_remove_blocking();
            Err(error)
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|error| panic!("failed to find a free port: {error}"))
}

/// A PostgreSQL cluster of a test's own that the test can crash or stop and start again on the same port
/// with the same data, to play an outage. Its directory is deleted when it is dropped or the test process
/// exits.
pub struct RestartablePostgres {
    port: u16,
    database_url: String,
    running: bool,
    supervisor: Supervisor,
}

/// Starts a cluster of the test's own (copied from the shared template) with a fresh database migrated with
/// `billing::MIGRATOR`. Panics with one line when PostgreSQL is missing or cannot start.
pub async fn spawn_restartable_postgres() -> RestartablePostgres {
    crate::init_test_logging();
    // A crash must keep what was committed, as a real deployment does; fsync stays off because the
    // operating system survives the crash.
    let (port, supervisor) = crate::run_blocking("starting PostgreSQL", || {
        start_attempts(&["-c", "synchronous_commit=on"])
    })
    .await;
    let server = server_options(port);
    let name = crate::create_database_on(&server, "test").await;
    let database_url = format!("postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable");
    let mut connection = PgConnection::connect_with(&server.database(&name))
        .await
        .unwrap_or_else(|error| panic!("failed to connect to database `{name}`: {error}"));
    billing::MIGRATOR
        .run(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("failed to migrate database `{name}`: {error}"));
    let _ = connection.close().await;
    RestartablePostgres {
        port,
        database_url,
        running: true,
        supervisor,
    }
}

impl RestartablePostgres {
    /// Returns the URL of its migrated database; the same across restarts.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Returns its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Crashes the cluster: an immediate shutdown (SIGQUIT to the postmaster, as `pg_ctl stop -m
    /// immediate`), which ends every connection at once and skips the checkpoint, so `start` runs crash
    /// recovery. Waits until postgres has exited.
    pub async fn kill(&mut self) {
        self.supervisor.signal("QUIT").await;
        self.running = false;
    }

    /// Stops the cluster with a fast shutdown (SIGINT: connections are ended, a checkpoint is written) and
    /// waits until postgres has exited.
    pub async fn stop(&mut self) {
        self.supervisor.signal("INT").await;
        self.running = false;
    }

    /// Starts the cluster again on the same port with the same data, and waits until its database accepts
    /// connections. Panics when it is running or cannot start (for example: another process took the port
    /// meanwhile).
    pub async fn start(&mut self) {
        assert!(!self.running, "postgres is already running");
        self.supervisor.start(READY).await;
        self.running = true;
        let patience = Duration::from_secs(60);
        let started = Instant::now();
        loop {
            match PgConnection::connect(&self.database_url).await {
                Ok(connection) => {
                    let _ = connection.close().await;
                    return;
                }
                Err(error) if started.elapsed() > patience => {
                    panic!("postgres did not accept connections within {patience:?}: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

/// A PostgreSQL cluster of a test's own that accepts only TLS connections (`hostssl` in its `pg_hba.conf`,
/// plaintext rejected), with a certificate from a test CA. It stops when dropped or when the test process
/// exits.
pub struct TlsPostgres {
    port: u16,
    database: String,
    _supervisor: Supervisor,
}

/// Starts a cluster of the test's own (copied from the shared template) with `ssl=on` and a certificate `ca`
/// issues for `localhost` and `127.0.0.1`, and creates a database migrated with `billing::MIGRATOR`.
/// Panics with one line when PostgreSQL is missing or cannot start.
pub async fn spawn_tls_postgres(ca: &crate::tls::TestCa) -> TlsPostgres {
    crate::init_test_logging();
    let cert = ca.issue("postgres", &["localhost", "127.0.0.1"]);
    let user = RunAs::detect();
    // PostgreSQL refuses a key that others may read, or that is not its own (or root's with group access).
    user.give(&cert.key_file);
    let hba_file = ca.dir().join("pg_hba.conf");
    fs::write(
        &hba_file,
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhost all all 0.0.0.0/0 reject\n",
    )
    .unwrap_or_else(|error| panic!("failed to write `{}`: {error}", hba_file.display()));
    let settings = [
        "-c".to_owned(),
        "ssl=on".to_owned(),
        "-c".to_owned(),
        format!("ssl_cert_file={}", cert.cert_file.display()),
        "-c".to_owned(),
        format!("ssl_key_file={}", cert.key_file.display()),
        "-c".to_owned(),
        format!("hba_file={}", hba_file.display()),
    ];
    let (port, supervisor) = crate::run_blocking("starting PostgreSQL with TLS", move || {
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        start_attempts(&settings)
    })
    .await;
    let server: PgConnectOptions = tls_url(port, "postgres", &ca.cert_file())
        .parse()
        .expect("a valid PostgreSQL URL");
    let database = crate::create_database_on(&server, "test").await;
    let mut connection = PgConnection::connect_with(&server.database(&database))
        .await
        .unwrap_or_else(|error| panic!("failed to connect to database `{database}`: {error}"));
    billing::MIGRATOR
        .run(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("failed to migrate database `{database}`: {error}"));
    let _ = connection.close().await;
    TlsPostgres {
        port,
        database,
        _supervisor: supervisor,
    }
}

impl TlsPostgres {
    /// Returns the URL of its migrated database with `sslmode=verify-full` and `sslrootcert=<ca_file>`.
    pub fn database_url_trusting(&self, ca_file: &Path) -> String {
        tls_url(self.port, &self.database, ca_file)
    }

    /// Returns the URL of its migrated database with `sslmode=<mode>` and no root certificate (the system
    /// roots, where a mode verifies).
    pub fn database_url_with_sslmode(&self, mode: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}?sslmode={mode}",
            self.port, self.database
        )
    }
}

fn tls_url(port: u16, database: &str, ca_file: &Path) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{port}/{database}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    )
}

/// Returns the options of the maintenance database of the cluster at `port`.
pub(crate) fn server_options(port: u16) -> PgConnectOptions {
    format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable")
        .parse()
        .expect("a valid PostgreSQL URL")
}
