//! A throwaway PostgreSQL cluster per test process, copied from an `initdb` template made once per machine.
//!
//! `initdb` takes seconds, so it runs once into a template directory under the temp dir (guarded by a lock
//! file, marked complete when done). Each test process copies the template, starts `postgres` on a free port
//! and keeps the stdin pipe of a small wrapper shell open; when the process exits, however it exits, the
//! pipe closes and the wrapper stops postgres and deletes the copy. No `unsafe`, no signals from Rust.

use std::{
    fs::{self, File},
    io::{BufRead, BufReader},
    net::TcpListener,
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::OnceLock,
    thread,
};

use uuid::Uuid;

/// Bump when the template's contents or initdb flags change, so stale templates are not reused.
const TEMPLATE_NAME: &str = "paygate-pg-template-v2";
/// Printed by the wrapper when postgres exits; never printed by postgres itself.
const EXITED_SENTINEL: &str = "paygate-harness: postgres exited";
/// A port picked by binding port 0 can be taken by someone else before postgres binds it; then we retry.
const START_ATTEMPTS: usize = 5;
const MISSING_BINARIES: &str = "PostgreSQL server binaries not found (initdb, postgres): install postgresql-15 or set DATABASE_URL";

// `$1` is the data directory, `$2` the template, the rest the postgres command line.
// - The copy happens in here, so a test process killed while copying leaves nothing behind. `cp -a` keeps
//   the owner (postgres, when we are root) and the 0700 mode postgres insists on.
// - fd 3 keeps our stdin for the watcher, because an asynchronous list's own stdin is /dev/null.
// - The watcher stops postgres through its pid file: under runuser, `$!` is runuser, which ignores SIGINT
//   here. TERM is the fallback for a postgres that has not written its pid file yet.
// - SIGPIPE is ignored (and inherited as ignored): once the test process is gone, every write to its
//   stderr pipe would otherwise kill the writer before the cleanup.
const WRAPPER_SCRIPT: &str = r#"
trap '' PIPE
dir=$1
template=$2
shift 2
exec 3<&0
if ! cp -a "$template" "$dir"; then
    rm -rf "$dir"
    echo "paygate-harness: postgres exited" >&2
    exit 1
fi
"$@" 3<&- </dev/null &
pid=$!
{ read -r _ignored <&3; kill -INT "$(head -n 1 "$dir/postmaster.pid")" || kill -TERM "$pid"; } 2>/dev/null &
wait "$pid"
rm -rf "$dir"
echo "paygate-harness: postgres exited" >&2
"#;

/// A running cluster, reachable at `127.0.0.1:port` as user `postgres` without a password. It stops when
/// the test process exits.
pub(crate) struct Cluster {
    pub(crate) port: u16,
    // Never written to: its only job is to close when the process exits.
    _stop_on_exit: ChildStdin,
}

/// Returns this process's cluster, starting it on first use. Blocks; panics with one line when PostgreSQL
/// is missing or cannot start.
pub(crate) fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

fn start_cluster() -> Cluster {
    let binaries = Binaries::find();
    let user = RunAs::detect();
    let mut last_error = String::new();
    for _ in 0..START_ATTEMPTS {
        // Shared while copying, so no other process rebuilds the template under the copy.
        let (template, _shared_lock) = ensure_template(&binaries, &user);
        match start_postgres(&binaries, &user, &template) {
            Ok(cluster) => return cluster,
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
fn start_postgres(binaries: &Binaries, user: &RunAs, template: &Path) -> Result<Cluster, String> {
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
        .args(["-c", "max_connections=200"]);
    let mut wrapper = Command::new("sh")
        .arg("-c")
        .arg(WRAPPER_SCRIPT)
        .arg("sh")
        .arg(&dir)
        .arg(template)
        .arg(postgres.get_program())
        .args(postgres.get_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("failed to start sh for postgres: {error}"));
    let stop_on_exit = wrapper.stdin.take().expect("stdin is piped");
    let stderr = wrapper.stderr.take().expect("stderr is piped");

    let mut lines = BufReader::new(stderr).lines();
    let mut last_line = String::from("postgres printed nothing");
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("ready to accept connections") => break,
            Some(Ok(line)) if line != EXITED_SENTINEL => last_line = line,
            _ => {
                drop(stop_on_exit);
                let _ = wrapper.wait();
                return Err(last_line);
            }
        }
    }

    // postgres logs to this pipe for as long as it runs; an unread pipe would fill and stall it.
    thread::spawn(move || lines.for_each(drop));
    Ok(Cluster {
        port,
        _stop_on_exit: stop_on_exit,
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|error| panic!("failed to find a free port: {error}"))
}
