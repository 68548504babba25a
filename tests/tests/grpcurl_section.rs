//! Runs the README's grpcurl section ("Administer billing with grpcurl") exactly as written, after the
//! walkthrough, against the no-Docker stack (`scripts/stack`), and checks each block's output against the
//! output the README shows after it. It uses grpcurl when grpcurl is on `PATH`; otherwise the workspace's
//! grpcurl-compatible client (`paygate-grpcurl`, a real gRPC client that learns the types through billing's
//! reflection service), under the name `grpcurl`.

mod readme;

use std::path::PathBuf;

use integration_tests::{
    ADMIN_TOKEN, fresh_database, spawn_billing, spawn_billing_with_tls, tls::TestCa,
};
use readme::Stack;

/// Returns the `grpcurl` on `PATH`, if there is one.
fn installed_grpcurl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("grpcurl"))
        .find(|candidate| candidate.is_file())
}

/// A directory to put in front of `PATH` in which `grpcurl` is the workspace's client.
struct StandInGrpcurl {
    dir: PathBuf,
}

impl StandInGrpcurl {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("paygate-grpcurl-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_paygate-grpcurl"), dir.join("grpcurl"))
            .expect("link paygate-grpcurl as grpcurl");
        Self { dir }
    }
}

impl Drop for StandInGrpcurl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_readme_grpcurl_section_works_as_written_after_the_walkthrough() {
    let walkthrough = readme::readme_section("walkthrough");
    let grpcurl_section = readme::readme_section("grpcurl");
    assert!(
        grpcurl_section.len() >= 5,
        "the grpcurl section has its steps"
    );
    let installed = installed_grpcurl();
    let stand_in = installed.is_none().then(StandInGrpcurl::new);
    let which = match &installed {
        Some(grpcurl) => format!("grpcurl at {}", grpcurl.display()),
        None => format!(
            "no grpcurl on PATH, so paygate-grpcurl ({}) as grpcurl",
            env!("CARGO_BIN_EXE_paygate-grpcurl")
        ),
    };
    eprintln!("the README's grpcurl section runs with {which}");
    let stack = Stack::start().await;
    stack
        .run_and_check(
            &walkthrough,
            None,
            "the walkthrough, before the grpcurl section",
        )
        .await;

    stack
        .run_and_check(
            &grpcurl_section,
            stand_in.as_ref().map(|stand_in| stand_in.dir.as_path()),
            &format!("the grpcurl section with {which}"),
        )
        .await;
}

/// Runs the workspace's grpcurl-compatible client with `arguments`.
async fn stand_in_grpcurl(arguments: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_paygate-grpcurl"))
        .args(arguments)
        .output()
        .await
        .expect("paygate-grpcurl runs")
}

#[tokio::test]
async fn the_stand_in_grpcurl_reads_proto3_json_and_prints_answers_as_grpcurl_does() {
    let billing = spawn_billing(fresh_database().await).await;
    let address = billing.addr.to_string();
    let authorization = format!("authorization: Bearer {ADMIN_TOKEN}");

    let output = stand_in_grpcurl(&[
        "-plaintext",
        "-H",
        &authorization,
        "-d",
        r#"{"code": "pro", "name": "Pro", "price_micros": 5000000, "interval": "BILLING_INTERVAL_MONTH",
            "includedUnits": 100, "overage_mode": "OVERAGE_MODE_BLOCK", "features": ["beta"]}"#,
        &address,
        "billing.v1.BillingAdmin/CreatePlan",
    ])
    .await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan: serde_json::Value = serde_json::from_str(&stdout).expect("the answer is JSON");
    // serde_json's map sorts its keys, so the order is read from the text.
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("  \""))
        .filter_map(|line| line.split_once('"').map(|(name, _)| name))
        .collect();
    assert_eq!(
        names,
        [
            "id",
            "code",
            "name",
            "currency",
            "priceMicros",
            "interval",
            "includedUnits",
            "overageMode",
            "features",
            "createdAt"
        ],
        "lowerCamelCase, in field order, defaults left out: {stdout}"
    );
    assert_eq!(plan["priceMicros"], "5000000");
    assert_eq!(plan["includedUnits"], "100");
    assert_eq!(plan["interval"], "BILLING_INTERVAL_MONTH");
    assert!(
        stdout.starts_with("{\n  \"id\": \"")
            && stdout.contains("\n  \"features\": [\n    \"beta\"\n  ],\n"),
        "indented by two spaces as grpcurl prints: {stdout}"
    );
}

#[tokio::test]
async fn a_failed_call_prints_grpcurls_error_block_and_exits_with_64_plus_the_code() {
    let billing = spawn_billing(fresh_database().await).await;

    let output = stand_in_grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        &billing.addr.to_string(),
        "billing.v1.BillingAdmin/ListPlans",
    ])
    .await;

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64 + 16), "{stderr}");
    assert!(
        stderr.starts_with("ERROR:\n  Code: Unauthenticated\n  Message: "),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[tokio::test]
async fn the_stand_in_grpcurl_lists_the_services_billing_reflects() {
    let billing = spawn_billing(fresh_database().await).await;

    let output = stand_in_grpcurl(&["-plaintext", &billing.addr.to_string(), "list"]).await;

    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "billing.v1.BillingAdmin\nbilling.v1.Entitlements\ngrpc.health.v1.Health\n"
    );
}

#[tokio::test]
async fn with_cacert_instead_of_plaintext_the_section_reaches_a_tls_billing_and_another_ca_is_refused()
 {
    let ca = TestCa::new("grpcurl-ca");
    let other = TestCa::new("grpcurl-other-ca");
    let cert = ca.issue("billing", &["localhost", "127.0.0.1"]);
    let tls = proto::tls::server_config(&cert.cert_file, &cert.key_file).expect("a usable pair");
    let billing = spawn_billing_with_tls(fresh_database().await, tls).await;
    let address = billing.addr.to_string();
    let ca_file = ca.cert_file();
    let other_file = other.cert_file();

    let trusted = stand_in_grpcurl(&[
        "-cacert",
        ca_file.to_str().expect("utf-8"),
        &address,
        "list",
    ])
    .await;
    let refused = stand_in_grpcurl(&[
        "-cacert",
        other_file.to_str().expect("utf-8"),
        &address,
        "list",
    ])
    .await;

    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&trusted.stdout),
        "billing.v1.BillingAdmin\nbilling.v1.Entitlements\ngrpc.health.v1.Health\n"
    );
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());
}
