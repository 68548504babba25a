//! paygatectl against a real billing service: the commands a provider scripts, and the errors a person sees.

use clap::Parser;
use integration_tests::{ADMIN_TOKEN, BillingInstance, fresh_database, spawn_billing};
use paygatectl::{Cli, CtlError};

/// Runs `paygatectl <args>` against `billing` with the admin token and returns what it printed.
async fn ctl(billing: &BillingInstance, args: &[&str]) -> Result<String, CtlError> {
    let url = format!("http://{}", billing.addr);
    let mut argv = vec!["paygatectl", "--url", &url, "--token", ADMIN_TOKEN];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    paygatectl::run(
        Cli::try_parse_from(argv).expect("valid arguments"),
        &mut out,
    )
    .await?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

async fn ok(billing: &BillingInstance, args: &[&str]) -> String {
    ctl(billing, args)
        .await
        .unwrap_or_else(|error| panic!("paygatectl {args:?} failed: {error}"))
}

#[tokio::test]
async fn a_provider_can_script_plan_customer_subscription_key_and_credits() {
    let billing = spawn_billing(fresh_database().await).await;

    let plan = ok(
        &billing,
        &[
            "plans",
            "create",
            "--code",
            "starter",
            "--included-units",
            "1000",
            "--price",
            "29",
            "-q",
        ],
    )
    .await;
    let customer = ok(
        &billing,
        &["customers", "create", "--external-id", "acme", "-q"],
    )
    .await;
    let subscription = ok(
        &billing,
        &[
            "subscriptions",
            "create",
            "--customer",
            customer.trim(),
            "--plan",
            plan.trim(),
            "--json",
        ],
    )
    .await;
    let payment = ok(
        &billing,
        &[
            "payments",
            "record",
            "--customer",
            customer.trim(),
            "--purpose",
            "subscription",
            "--amount",
            "29",
            "--idempotency-key",
            "ch_1",
            "--json",
        ],
    )
    .await;
    let secret = ok(
        &billing,
        &["keys", "issue", "--customer", customer.trim(), "-q"],
    )
    .await;
    ok(
        &billing,
        &[
            "credits",
            "grant",
            "--customer",
            customer.trim(),
            "--amount",
            "12.5",
            "--reference",
            "welcome",
        ],
    )
    .await;
    let balance = ok(
        &billing,
        &["credits", "balance", "--customer", customer.trim()],
    )
    .await;
    let keys = ok(&billing, &["keys", "list", "--customer", customer.trim()]).await;
    let audit: serde_json::Value =
        serde_json::from_str(&ok(&billing, &["audit", "--json"]).await).expect("json");

    let subscription: serde_json::Value = serde_json::from_str(&subscription).expect("json");
    let payment: serde_json::Value = serde_json::from_str(&payment).expect("json");
    assert_eq!(subscription["plan_code"], "starter");
    assert_eq!(subscription["status"], "past_due");
    assert_eq!(payment["amount"], "29.00");
    assert_eq!(payment["outcome"], "succeeded");
    assert!(proto::api_key::is_well_formed(secret.trim()));
    assert_eq!(balance.trim(), "12.50 USD");
    assert!(keys.contains(&secret.trim()[..12]));
    assert!(
        !keys.contains(secret.trim()),
        "a listing must never show a secret"
    );
    assert_eq!(audit["events"].as_array().map(Vec::len), Some(6));
}

async fn run(argv: &[&str]) -> Result<(), CtlError> {
    let mut out = Vec::new();
    paygatectl::run(
        Cli::try_parse_from(argv).expect("valid arguments"),
        &mut out,
    )
    .await
}

#[tokio::test]
async fn errors_say_what_is_wrong_in_one_line() {
    let billing = spawn_billing(fresh_database().await).await;
    let url = format!("http://{}", billing.addr);

    let wrong_token = run(&[
        "paygatectl",
        "--url",
        &url,
        "--token",
        "wrong-token-0123456",
        "plans",
        "list",
    ])
    .await;
    let unreachable = run(&[
        "paygatectl",
        "--url",
        "http://127.0.0.1:1",
        "--token",
        ADMIN_TOKEN,
        "plans",
        "list",
    ])
    .await;
    let invalid = ctl(&billing, &["customers", "get", "not-a-uuid"]).await;
    let missing = ctl(
        &billing,
        &["customers", "get", "00000000-0000-7000-8000-000000000000"],
    )
    .await;

    assert!(matches!(wrong_token, Err(CtlError::Unauthenticated)));
    assert!(matches!(unreachable, Err(CtlError::Unreachable { .. })));
    let invalid = invalid.expect_err("invalid").to_string();
    assert!(
        invalid.starts_with("invalid argument:") && invalid.contains("customer_id"),
        "{invalid}"
    );
    assert!(!invalid.contains('\n'));
    assert!(
        missing
            .expect_err("missing")
            .to_string()
            .starts_with("not found:")
    );
}
