//! Runs the README's five-minute walkthrough exactly as written, against the no-Docker stack
//! (`scripts/stack`), and checks each block's output against the output the README shows after it. The
//! README cannot drift from the truth without this test failing.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BLOCK_END: &str = "__paygate_walkthrough_block_end__";

/// One step of the walkthrough: shell commands, and the output the README promises (if it shows one).
#[derive(Debug)]
struct Step {
    commands: String,
    expected: Option<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// Returns the ```sh and ```text blocks between the walkthrough markers, each text block attached to the
/// sh block before it.
fn walkthrough_steps(readme: &str) -> Vec<Step> {
    let begin = readme
        .find("<!-- walkthrough:begin -->")
        .expect("README has the walkthrough begin marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("README has the walkthrough end marker");
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
fn matches(expected: &str, actual: &str) -> bool {
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

/// The stack started by `scripts/stack`; stopped (as Ctrl-C would) when dropped.
struct Stack {
    child: Child,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        // The script stops every service it started before it exits; wait (bounded) until it has, reaping
        // it so its pid cannot linger as a zombie.
        for _ in 0..600 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

#[tokio::test]
async fn the_readme_walkthrough_works_as_written_against_the_local_stack() {
    let root = workspace_root();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(&cargo)
        .current_dir(&root)
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
    let bin = target.join("debug");
    let stack_dir = std::env::temp_dir().join(format!(
        "paygate-walkthrough-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let gateway_port = free_port();
    let billing_port = free_port();
    let mut child = Command::new("bash")
        .arg(root.join("scripts/stack"))
        .arg("--fresh")
        .env("PAYGATE_STACK_DIR", &stack_dir)
        .env("PAYGATE_BIN_DIR", &bin)
        .env("PAYGATE_GATEWAY_PORT", gateway_port.to_string())
        .env("PAYGATE_BILLING_PORT", billing_port.to_string())
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
    let stack = Stack { child };
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
    let admin_token = printed
        .iter()
        .find_map(|line| line.trim().strip_prefix("export PAYGATE_ADMIN_TOKEN="))
        .expect("the stack prints the admin token")
        .to_owned();
    let steps =
        walkthrough_steps(&std::fs::read_to_string(root.join("README.md")).expect("README.md"));
    let script: String = steps
        .iter()
        .map(|step| format!("{}\necho {BLOCK_END}\n", step.commands))
        .collect();

    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env(
            "PAYGATE_ADMIN_URL",
            format!("http://127.0.0.1:{billing_port}"),
        )
        .env("PAYGATE_ADMIN_TOKEN", &admin_token)
        .env("GATEWAY", format!("http://127.0.0.1:{gateway_port}"))
        .output()
        .await
        .expect("bash runs");
    drop(stack);
    let _ = std::fs::remove_dir_all(&stack_dir);

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let outputs: Vec<&str> = stdout.split(&format!("{BLOCK_END}\n")).collect();
    assert!(steps.len() >= 5, "the walkthrough has its steps");
    for (step, actual) in steps.iter().zip(&outputs) {
        if let Some(expected) = &step.expected {
            assert!(
                matches(expected, actual.trim_end()),
                "after\n{}\nthe README shows\n{expected}\nbut the stack printed\n{actual}",
                step.commands
            );
        }
    }
}

#[test]
fn the_walkthrough_matcher_treats_an_ellipsis_as_any_text() {
    assert!(matches("a…c", "abbbc"));
    assert!(matches("{\"x\":\"…\",\"y\":1}", "{\"x\":\"2026\",\"y\":1}"));
    assert!(!matches("a…c", "abd"));
    assert!(!matches("200\n200", "200"));
    assert!(matches("exact", "exact"));
}
