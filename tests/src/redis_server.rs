//! A throwaway Redis server per test process, with the persistence usage insists on (AOF, `everysec`),
//! and on request more servers with other settings.
//!
//! Like the PostgreSQL cluster, it runs under a small wrapper shell whose stdin pipe we keep open: when the
//! test process exits, however it exits, the pipe closes and the wrapper stops redis and deletes its
//! directory.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{ChildStdin, Command, Stdio},
    sync::OnceLock,
    thread,
};

use uuid::Uuid;

const START_ATTEMPTS: usize = 5;
const MISSING_BINARY: &str =
    "redis-server not found: install redis-server (apt-get install redis-server) or set REDIS_URL";
/// Printed by the wrapper when redis exits; never printed by redis itself.
const EXITED_SENTINEL: &str = "paygate-harness: redis exited";

// `$1` is the data directory, the rest is the redis command line. fd 3 keeps our stdin for the watcher,
// because an asynchronous list's own stdin is /dev/null. SIGPIPE is ignored: once the test process is
// gone, writing to its stdout pipe would kill the shell before it removes the directory.
const WRAPPER_SCRIPT: &str = r#"
trap '' PIPE
dir=$1
shift
exec 3<&0
"$@" 3<&- </dev/null &
pid=$!
{ read -r _ignored <&3; kill -TERM "$pid"; } 2>/dev/null &
wait "$pid"
rm -rf "$dir"
echo "paygate-harness: redis exited"
"#;

/// A running Redis server at `127.0.0.1:port`. It stops when dropped, or when the test process exits.
pub(crate) struct Server {
    pub(crate) port: u16,
    _stop_on_exit: ChildStdin,
}

/// Returns this process's Redis server, starting it on first use. Blocks; panics with one line when
/// `redis-server` is missing or cannot start.
pub(crate) fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(start_server)
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
pub(crate) const DURABLE: &[&str] = &[
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--maxmemory-policy",
    "noeviction",
];

fn start_server() -> Server {
    start_with(DURABLE)
}

/// Starts another Redis server with `settings` (e.g. persistence off); it stops when the returned value
/// is dropped or the process exits.
pub(crate) fn start_with(settings: &[&str]) -> Server {
    let binary = find_binary();
    let mut last_error = String::new();
    for _ in 0..START_ATTEMPTS {
        match start_redis(&binary, settings) {
            Ok(server) => return server,
            Err(error) => last_error = error,
        }
    }
    panic!("redis failed to start after {START_ATTEMPTS} attempts: {last_error}");
}

fn start_redis(binary: &PathBuf, settings: &[&str]) -> Result<Server, String> {
    let dir = std::env::temp_dir().join(format!("paygate-redis-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|error| panic!("failed to create `{}`: {error}", dir.display()));
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|error| panic!("failed to find a free port: {error}"));

    let mut wrapper = Command::new("sh")
        .arg("-c")
        .arg(WRAPPER_SCRIPT)
        .arg("sh")
        .arg(&dir)
        .arg(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&dir)
        .args(["--save", "", "--daemonize", "no", "--logfile", ""])
        .args(settings)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("failed to start sh for redis: {error}"));
    let stop_on_exit = wrapper.stdin.take().expect("stdin is piped");
    let stdout = wrapper.stdout.take().expect("stdout is piped");

    let mut lines = BufReader::new(stdout).lines();
    let mut last_line = String::from("redis printed nothing");
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("Ready to accept connections") => break,
            Some(Ok(line)) if line != EXITED_SENTINEL => last_line = line,
            _ => {
                drop(stop_on_exit);
                let _ = wrapper.wait();
                return Err(last_line);
            }
        }
    }
    // redis logs to this pipe for as long as it runs; an unread pipe would fill and stall it.
    thread::spawn(move || lines.for_each(drop));
    Ok(Server {
        port,
        _stop_on_exit: stop_on_exit,
    })
}
