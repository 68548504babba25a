//! Runs sections of README.md exactly as written against the no-Docker stack (`scripts/stack`), in a shell
//! that has only the `export` lines the stack printed, and checks each block's output against the output the
//! README shows after it. The README cannot drift from the truth without these tests failing.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BLOCK_END: &str = "__paygate_readme_block_end__";

/// One step of a README section: shell commands, and the output the README promises (if it shows one).
#[derive(Debug)]
pub struct Step {
    pub commands: String,
    pub expected: Option<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// Returns the steps of the README section between `<!-- {section}:begin -->` and `<!-- {section}:end -->`.
pub fn readme_section(section: &str) -> Vec<Step> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    section_steps(&readme, section)
}

/// Returns the ```sh and ```text blocks between a section's markers, each text block attached to the sh
/// block before it.
pub fn section_steps(readme: &str, section: &str) -> Vec<Step> {
    let begin = readme
        .find(&format!("<!-- {section}:begin -->"))
        .unwrap_or_else(|| panic!("README has the {section} begin marker"));
    let end = readme
        .find(&format!("<!-- {section}:end -->"))
        .unwrap_or_else(|| panic!("README has the {section} end marker"));
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = readme[begin..end].lines();
    while let Some(line) = lines.next() {
        let kind = match line.trim() {
            "```sh" => "sh",
            "```text" => "text",
            _ => continue,
        };
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|line| line.trim() != "```")
            .collect();
        let block = block.join("\n");
        match kind {
            "sh" => steps.push(Step {
                commands: block,
                expected: None,
            }),
            _ => {
                steps
                    .last_mut()
                    .expect("a text block follows a sh block")
                    .expected = Some(block)
            }
        }
    }
    steps
}

/// Tells whether `actual` matches `expected`, where `…` in `expected` stands for any text within a line.
pub fn matches(expected: &str, actual: &str) -> bool {
    let expected: Vec<&str> = expected.lines().collect();
    let actual: Vec<&str> = actual.lines().collect();
    expected.len() == actual.len()
        && expected.iter().zip(&actual).all(|(pattern, line)| {
            let mut parts = pattern.split('…');
            let first = parts.next().unwrap_or_default();
            let Some(mut rest) = line.strip_prefix(first) else {
                return false;
            };
            let parts: Vec<&str> = parts.collect();
            for (index, part) in parts.iter().enumerate() {
                if index == parts.len() - 1 {
                    return rest.ends_with(part);
                }
                match rest.find(part) {
                    Some(position) => rest = &rest[position + part.len()..],
                    None => return false,
                }
            }
            rest.is_empty()
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// Builds the binaries `scripts/stack` runs into this test's target directory, and returns where they are.
async fn build_service_binaries() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(&cargo)
        .current_dir(workspace_root())
        // The same packages as the other tests that build service binaries, so that all of them share one
        // set of artifacts instead of each compiling the dependencies with its own feature set.
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
    assert!(built.success(), "building the service binaries failed");
    target.join("debug")
}

/// The stack started by `scripts/stack` on free ports with fresh data; stopped (as Ctrl-C would) and its
/// data removed when dropped.
pub struct Stack {
    child: Child,
    dir: PathBuf,
    exports: Vec<String>,
}

impl Stack {
    /// Builds the binaries, starts the stack, and waits until it says it is running.
    pub async fn start() -> Self {
        let bin = build_service_binaries().await;
        let dir =
            std::env::temp_dir().join(format!("paygate-readme-{}", uuid::Uuid::new_v4().simple()));
        let mut child = Command::new("bash")
            .arg(workspace_root().join("scripts/stack"))
            .arg("--fresh")
            .env("PAYGATE_STACK_DIR", &dir)
            .env("PAYGATE_BIN_DIR", &bin)
            .env("PAYGATE_GATEWAY_PORT", free_port().to_string())
            .env("PAYGATE_BILLING_PORT", free_port().to_string())
            .env("PAYGATE_USAGE_PORT", free_port().to_string())
            .env("PAYGATE_UPSTREAM_PORT", free_port().to_string())
            .env("PAYGATE_PG_PORT", free_port().to_string())
            .env("PAYGATE_REDIS_PORT", free_port().to_string())
            .env("PAYGATE_GATEWAY_METRICS_PORT", free_port().to_string())
            .env("PAYGATE_BILLING_METRICS_PORT", free_port().to_string())
            .env("PAYGATE_USAGE_METRICS_PORT", free_port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("scripts/stack starts");
        let stdout = child.stdout.take().expect("piped");
        let mut stack = Self {
            child,
            dir,
            exports: Vec::new(),
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut printed = Vec::new();
        loop {
            match lines.next_line().await.expect("read the stack's output") {
                Some(line) if line.starts_with("Press Ctrl-C") => break,
                Some(line) => printed.push(line),
                None => panic!(
                    "scripts/stack ended before it was ready:\n{}",
                    printed.join("\n")
                ),
            }
        }
        stack.exports = printed
            .iter()
            .map(|line| line.trim())
            .filter(|line| line.starts_with("export "))
            .map(str::to_owned)
            .collect();
        assert!(
            stack
                .exports
                .iter()
                .any(|line| line.starts_with("export PATH=")),
            "the stack prints its export lines:\n{}",
            printed.join("\n")
        );
        stack
    }

    /// Runs `steps` in order in one `bash -euo pipefail` that has run the stack's `export` lines, with
    /// `path` in front of this process's `PATH`, and asserts that each step printed what its README text
    /// block shows. `context` names the run in failure messages.
    pub async fn run_and_check(&self, steps: &[Step], path: Option<&Path>, context: &str) {
        let script: String = self
            .exports
            .iter()
            .map(|line| format!("{line}\n"))
            .chain(
                steps
                    .iter()
                    .map(|step| format!("{}\necho {BLOCK_END}\n", step.commands)),
            )
            .collect();
        let inherited = std::env::var_os("PATH").unwrap_or_default();
        let search_path = std::env::join_paths(
            path.into_iter()
                .map(Path::to_owned)
                .chain(std::env::split_paths(&inherited)),
        )
        .expect("a PATH");

        let output = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("PATH", search_path)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("bash runs");

        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{context}: the README failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let outputs: Vec<&str> = stdout.split(&format!("{BLOCK_END}\n")).collect();
        assert_eq!(
            outputs.len(),
            steps.len() + 1,
            "{context}: every block ran:\n{stdout}"
        );
        for (step, actual) in steps.iter().zip(&outputs) {
            if let Some(expected) = &step.expected {
                assert!(
                    matches(expected, actual.trim_end()),
                    "{context}: after\n{}\nthe README shows\n{expected}\nbut the stack printed\n{actual}",
                    step.commands
                );
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            // The script stops every service it started before it exits; wait (bounded) until it has,
            // reaping it so its pid cannot linger as a zombie.
            for _ in 0..600 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
