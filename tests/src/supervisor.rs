//! A server process (redis-server, postgres) under a small supervising shell that the test drives through
//! its stdin: `start` runs the server again with the same command line, `signal-<SIG>` sends it a signal and
//! waits until it has exited. When the stdin pipe closes — the value is dropped, or the test process exits
//! however it exits — the shell stops the server and deletes its directory. No `unsafe`, no signals from
//! Rust.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::Duration,
};

use tokio::sync::mpsc;

/// Printed by the shell when the server exits; never printed by the servers themselves.
const EXITED: &str = "paygate-harness: server exited";
/// Printed by the shell once a signalled server has exited.
const STOPPED: &str = "paygate-harness: server stopped";
/// How long a start or a stop may take on a loaded machine before the harness gives up.
const PATIENCE: Duration = Duration::from_secs(60);

// `$1` is the server's directory, `$2` a template to copy into it first (empty: none), `$3` the file whose
// first line is the server's pid, the rest the server's command line.
// - The server's pid comes from its own pid file: under runuser, `$!` would be runuser.
// - The copy happens in here, so a test process killed while copying leaves nothing behind. `cp -a` keeps
//   the owner (postgres, when we are root) and the 0700 mode postgres insists on.
// - An asynchronous list's stdin is /dev/null, so only this shell holds the pipe it reads commands from.
// - SIGPIPE is ignored (and inherited as ignored): once the test process is gone, every write to its
//   pipe would otherwise kill the writer before the cleanup.
const SUPERVISOR_SCRIPT: &str = r#"
trap '' PIPE
exec 2>&1
dir=$1
template=$2
pidfile=$3
shift 3
if [ -n "$template" ] && ! cp -a "$template" "$dir"; then
    rm -rf "$dir"
    echo "paygate-harness: server exited"
    exit 1
fi
running=
while read -r command; do
    case $command in
    start)
        { "$@" </dev/null; echo "paygate-harness: server exited"; } &
        running=$!
        ;;
    signal-*)
        if [ -n "$running" ]; then
            kill -"${command#signal-}" "$(head -n 1 "$pidfile")" 2>/dev/null
            wait "$running"
        fi
        running=
        echo "paygate-harness: server stopped"
        ;;
    esac
done
if [ -n "$running" ]; then
    kill -TERM "$(head -n 1 "$pidfile")" 2>/dev/null
    wait "$running"
fi
rm -rf "$dir"
"#;

/// A server process the test can signal and start again; its directory is deleted when this is dropped.
pub(crate) struct Supervisor {
    commands: ChildStdin,
    output: mpsc::UnboundedReceiver<String>,
    last_line: String,
    shell: Child,
}

impl Supervisor {
    /// Spawns the shell for `server` (not started yet: call `start`). `template` is copied to `dir` first
    /// when given; `pid_file` is where the server writes its pid.
    pub(crate) fn spawn(
        server: &Command,
        dir: &Path,
        template: Option<&Path>,
        pid_file: &Path,
    ) -> Self {
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR_SCRIPT)
            .arg("sh")
            .arg(dir)
            .arg(template.unwrap_or(Path::new("")))
            .arg(pid_file)
            .arg(server.get_program())
            .args(server.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start sh for a server: {error}"));
        let commands = shell.stdin.take().expect("stdin is piped");
        let stdout = shell.stdout.take().expect("stdout is piped");
        let (lines, output) = mpsc::unbounded_channel();
        // The server logs to this pipe for as long as it runs; an unread pipe would fill and stall it.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines.send(line);
            }
        });
        Self {
            commands,
            output,
            last_line: String::from("the server printed nothing"),
            shell,
        }
    }

    /// Starts the server and blocks until it prints a line containing `ready`. `Err` holds its last line
    /// when it exited instead (typically: its port was taken meanwhile).
    pub(crate) fn start_blocking(&mut self, ready: &str) -> Result<(), String> {
        self.send("start");
        loop {
            let line = self.output.blocking_recv();
            if let Some(outcome) = self.outcome_of(line, ready) {
                return outcome;
            }
        }
    }

    /// Starts the server and waits until it prints a line containing `ready`; panics with its last line
    /// when it exits instead or takes longer than a minute.
    pub(crate) async fn start(&mut self, ready: &str) {
        self.send("start");
        self.wait_for(ready)
            .await
            .unwrap_or_else(|last_line| panic!("the server failed to start: {last_line}"));
    }

    /// Sends `signal` (`KILL`, `TERM`, `INT`, `QUIT`) to the server and waits until it has exited.
    pub(crate) async fn signal(&mut self, signal: &str) {
        self.send(&format!("signal-{signal}"));
        let waiting = async {
            // The server's own exit line comes first; the shell's line comes once it has reaped it.
            while let Some(line) = self.output.recv().await {
                if line == STOPPED {
                    return;
                }
            }
            panic!("the server's shell is gone");
        };
        tokio::time::timeout(PATIENCE, waiting)
            .await
            .unwrap_or_else(|_| panic!("the server did not stop within {PATIENCE:?}"));
    }

    async fn wait_for(&mut self, ready: &str) -> Result<(), String> {
        let waiting = async {
            loop {
                let line = self.output.recv().await;
                if let Some(outcome) = self.outcome_of(line, ready) {
                    return outcome;
                }
            }
        };
        tokio::time::timeout(PATIENCE, waiting)
            .await
            .unwrap_or_else(|_| panic!("no `{ready}` from the server within {PATIENCE:?}"))
    }

    fn outcome_of(&mut self, line: Option<String>, ready: &str) -> Option<Result<(), String>> {
        match line {
            Some(line) if line.contains(ready) => Some(Ok(())),
            Some(line) if line == EXITED => Some(Err(self.last_line.clone())),
            Some(line) => {
                self.last_line = line;
                None
            }
            None => Some(Err(self.last_line.clone())),
        }
    }

    fn send(&mut self, command: &str) {
        use std::io::Write;
        writeln!(self.commands, "{command}")
            .unwrap_or_else(|error| panic!("the server's shell is gone: {error}"));
    }

    /// Stops the server, deletes its directory and waits until both are done.
    pub(crate) fn stop_and_remove_blocking(self) {
        let Self {
            commands,
            mut shell,
            ..
        } = self;
        drop(commands);
        let _ = shell.wait();
    }
}
