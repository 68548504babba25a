//! paygatectl against a real billing service: the commands a provider scripts, and the errors a person sees.

use clap::{CommandFactory, Parser, error::ErrorKind};
use http::{Response, StatusCode};
use integration_tests::{
    ADMIN_TOKEN, BillingInstance, body, fresh_database, spawn_billing, spawn_upstream,
};
use paygatectl::{Cli, CtlError};
use proto::billing::v1::GetCustomerRequest;

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
    let invalid = ctl(&billing, &["subscriptions", "cancel", "not-a-uuid"]).await;
    let missing = ctl(
        &billing,
        &["keys", "revoke", "00000000-0000-7000-8000-000000000000"],
    )
    .await;

    assert!(matches!(wrong_token, Err(CtlError::Unauthenticated)));
    assert!(matches!(unreachable, Err(CtlError::Unreachable { .. })));
    let invalid = invalid.expect_err("invalid").to_string();
    assert_eq!(invalid, "<ID> must be a UUID");
    assert!(!invalid.contains('\n'));
    assert!(
        missing
            .expect_err("missing")
            .to_string()
            .starts_with("not found:")
    );
}

/// Parses `paygatectl <args>` as the shell would hand them over, without running anything.
fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(
        [
            "paygatectl",
            "--url",
            "http://127.0.0.1:1",
            "--token",
            ADMIN_TOKEN,
        ]
        .iter()
        .chain(args),
    )
}

#[tokio::test]
async fn plan_codes_and_external_ids_work_wherever_an_id_is_taken() {
    let billing = spawn_billing(fresh_database().await).await;
    ok(
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
        ],
    )
    .await;
    let customer_id = ok(
        &billing,
        &["customers", "create", "--external-id", "acme", "-q"],
    )
    .await;
    // Operators often use their own UUIDs as external ids: one shaped like an id must still be found.
    let uuid_shaped = "0190f1f2-3c4d-7e5f-8a9b-0c1d2e3f4a5b";
    let other_customer_id = ok(
        &billing,
        &["customers", "create", "--external-id", uuid_shaped, "-q"],
    )
    .await;

    let shown = ok(&billing, &["customers", "get", "acme", "-q"]).await;
    let shown_by_uuid_shaped = ok(&billing, &["customers", "get", uuid_shaped, "-q"]).await;
    let subscription: serde_json::Value = serde_json::from_str(
        &ok(
            &billing,
            &[
                "subscriptions",
                "create",
                "--customer",
                "acme",
                "--plan",
                "starter",
                "--json",
            ],
        )
        .await,
    )
    .expect("json");
    ok(
        &billing,
        &[
            "payments",
            "record",
            "--customer",
            "acme",
            "--purpose",
            "top-up",
            "--amount",
            "12.5",
            "--idempotency-key",
            "ch_1",
        ],
    )
    .await;
    ok(
        &billing,
        &[
            "credits",
            "adjust",
            "--customer",
            "acme",
            "--amount",
            "-2.5",
            "--reference",
            "goodwill-reversal",
            "--note",
            "typo",
        ],
    )
    .await;
    let balance = ok(&billing, &["credits", "balance", "--customer", "acme"]).await;
    let key = ok(&billing, &["keys", "issue", "--customer", "acme", "-q"]).await;
    let keys = ok(&billing, &["keys", "list", "--customer", "acme"]).await;
    let archived: serde_json::Value =
        serde_json::from_str(&ok(&billing, &["plans", "archive", "starter", "--json"]).await)
            .expect("json");
    let audit: serde_json::Value =
        serde_json::from_str(&ok(&billing, &["audit", "--target", "acme", "--json"]).await)
            .expect("json");

    assert_eq!(shown.trim(), customer_id.trim());
    assert_eq!(shown_by_uuid_shaped.trim(), other_customer_id.trim());
    assert_eq!(subscription["customer_id"], customer_id.trim());
    assert_eq!(subscription["plan_code"], "starter");
    assert_eq!(balance.trim(), "10.00 USD");
    assert!(keys.contains(&key.trim()[..12]), "{keys}");
    assert!(!archived["archived_at"].is_null());
    let events = audit["events"].as_array().expect("events");
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|event| event["target_id"] == customer_id.trim()),
        "{audit}"
    );
}

#[tokio::test]
async fn a_name_that_matches_nothing_is_refused_naming_the_flag() {
    let billing = spawn_billing(fresh_database().await).await;
    ok(
        &billing,
        &["customers", "create", "--external-id", "acme", "-q"],
    )
    .await;

    let no_customer = ctl(&billing, &["credits", "balance", "--customer", "nobody"]).await;
    let no_plan = ctl(
        &billing,
        &[
            "subscriptions",
            "create",
            "--customer",
            "acme",
            "--plan",
            "platinum",
        ],
    )
    .await;
    let no_such_id = ctl(
        &billing,
        &["customers", "get", "00000000-0000-7000-8000-000000000000"],
    )
    .await;

    assert_eq!(
        no_customer.expect_err("unknown customer").to_string(),
        "--customer: no customer has the id or external id `nobody`"
    );
    assert_eq!(
        no_plan.expect_err("unknown plan").to_string(),
        "--plan: no plan has the id or code `platinum`"
    );
    assert_eq!(
        no_such_id.expect_err("unknown id").to_string(),
        "<CUSTOMER>: no customer has the id or external id `00000000-0000-7000-8000-000000000000`"
    );
}

#[tokio::test]
async fn errors_speak_in_flags_and_currency_never_in_proto_fields_or_micros() {
    let billing = spawn_billing(fresh_database().await).await;
    ok(
        &billing,
        &[
            "customers",
            "create",
            "--external-id",
            "acme",
            "--currency",
            "EUR",
        ],
    )
    .await;

    let bad_code = ctl(
        &billing,
        &[
            "plans",
            "create",
            "--code",
            "Starter!",
            "--included-units",
            "1",
        ],
    )
    .await;
    let credits_without_price = ctl(
        &billing,
        &[
            "plans",
            "create",
            "--code",
            "metered",
            "--included-units",
            "1",
            "--overage",
            "credits",
        ],
    )
    .await;
    let bad_currency = ctl(
        &billing,
        &[
            "customers",
            "create",
            "--external-id",
            "b",
            "--currency",
            "eur",
        ],
    )
    .await;
    let below_zero = ctl(
        &billing,
        &[
            "credits",
            "adjust",
            "--customer",
            "acme",
            "--amount",
            "-5",
            "--reference",
            "r1",
            "--note",
            "oops",
        ],
    )
    .await;

    let bad_code = bad_code.expect_err("bad code").to_string();
    assert!(bad_code.starts_with("--code must be "), "{bad_code}");
    assert_eq!(
        credits_without_price
            .expect_err("no unit price")
            .to_string(),
        "--unit-price must be positive when overage is paid from credits"
    );
    let bad_currency = bad_currency.expect_err("bad currency").to_string();
    assert!(
        bad_currency.starts_with("--currency must be three upper-case letters"),
        "{bad_currency}"
    );
    assert_eq!(
        below_zero.expect_err("below zero").to_string(),
        "not possible now: the adjustment would take the balance below zero \
         (balance 0.00 EUR, adjustment -5.00 EUR)"
    );
}

#[test]
fn negative_numbers_parse_where_allowed_and_are_refused_clearly_where_not() {
    let adjustment = parse(&[
        "credits",
        "adjust",
        "--customer",
        "acme",
        "--amount",
        "-5",
        "--reference",
        "r",
        "--note",
        "n",
    ]);
    let grant = parse(&[
        "credits",
        "grant",
        "--customer",
        "acme",
        "--amount",
        "-5",
        "--reference",
        "r",
    ]);
    let payment = parse(&[
        "payments",
        "record",
        "--customer",
        "acme",
        "--purpose",
        "top-up",
        "--amount",
        "-5",
        "--idempotency-key",
        "k",
    ]);
    let units = parse(&["plans", "create", "--code", "p", "--included-units", "-1"]);

    assert!(adjustment.is_ok(), "{:?}", adjustment.err());
    for (refused, flag, why) in [
        (grant, "--amount", "must be positive"),
        (payment, "--amount", "must be positive"),
        (units, "--included-units", "must not be negative"),
    ] {
        let error = refused.expect_err("refused");
        let message = error.to_string();
        assert_eq!(error.kind(), ErrorKind::ValueValidation, "{message}");
        assert!(
            message.contains("invalid value '-") && message.contains(flag),
            "{message}"
        );
        assert!(message.contains(why), "{message}");
    }
}

#[test]
fn usage_lines_do_not_ask_for_url_or_token_and_help_names_their_variables() {
    let mut command = Cli::command();
    let grant = command
        .find_subcommand_mut("credits")
        .and_then(|credits| credits.find_subcommand_mut("grant"))
        .expect("credits grant")
        .render_usage()
        .to_string();
    let help = Cli::command().render_help().to_string();

    assert!(grant.contains("--customer <CUSTOMER>"), "{grant}");
    assert!(!grant.contains("--url"), "{grant}");
    assert!(!grant.contains("--token"), "{grant}");
    assert!(help.contains("PAYGATE_ADMIN_URL"), "{help}");
    assert!(help.contains("PAYGATE_ADMIN_TOKEN"), "{help}");
}

#[tokio::test]
async fn a_missing_token_names_the_variable_to_set() {
    let mut cli = parse(&["plans", "list"]).expect("valid arguments");
    cli.token = None;

    let missing = paygatectl::run(cli, &mut Vec::new()).await;

    assert_eq!(
        missing.expect_err("no token").to_string(),
        "no admin token: set PAYGATE_ADMIN_TOKEN (or pass --token)"
    );
}

#[tokio::test]
async fn get_customer_finds_a_customer_by_external_id_and_refuses_both_ids_at_once() {
    let billing = spawn_billing(fresh_database().await).await;
    let created = ok(
        &billing,
        &["customers", "create", "--external-id", "acme", "-q"],
    )
    .await;
    let mut admin = billing.admin().await;

    let found = admin
        .get_customer(GetCustomerRequest {
            customer_id: String::new(),
            external_id: "acme".into(),
        })
        .await;
    let missing = admin
        .get_customer(GetCustomerRequest {
            customer_id: String::new(),
            external_id: "nobody".into(),
        })
        .await;
    let both = admin
        .get_customer(GetCustomerRequest {
            customer_id: created.trim().into(),
            external_id: "acme".into(),
        })
        .await;

    assert_eq!(found.expect("found").into_inner().id, created.trim());
    assert_eq!(missing.expect_err("missing").code(), tonic::Code::NotFound);
    assert_eq!(both.expect_err("both").code(), tonic::Code::InvalidArgument);
}

async fn health(args: &[&str]) -> Result<(), CtlError> {
    let cli =
        Cli::try_parse_from(["paygatectl", "health"].iter().chain(args)).expect("valid arguments");
    paygatectl::run(cli, &mut Vec::new()).await
}

#[tokio::test]
async fn health_grpc_passes_only_when_the_server_is_serving() {
    let billing = spawn_billing(fresh_database().await).await;
    let target = billing.addr.to_string();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").to_string()
    };

    let serving = health(&["grpc", &target]).await;
    let admin_serving = health(&["grpc", &target, "--service", "billing.v1.BillingAdmin"]).await;
    let unknown_service = health(&["grpc", &target, "--service", "no.such.Service"]).await;
    let unreachable = health(&["grpc", &closed]).await;

    assert!(serving.is_ok(), "{:?}", serving.err());
    assert!(admin_serving.is_ok(), "{:?}", admin_serving.err());
    let unknown_service = unknown_service.expect_err("unknown service").to_string();
    assert!(unknown_service.contains("NotFound"), "{unknown_service}");
    let unreachable = unreachable.expect_err("unreachable").to_string();
    assert!(unreachable.contains("unreachable"), "{unreachable}");
}

#[tokio::test]
async fn health_http_passes_only_on_a_2xx_answer() {
    let ready = spawn_upstream(|request| async move {
        let status = if request.uri().path() == "/_paygate/ready" {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut answer = Response::new(body("ready"));
        *answer.status_mut() = status;
        answer
    })
    .await;

    let passed = health(&["http", &format!("http://{}/_paygate/ready", ready.addr)]).await;
    let failed = health(&["http", &format!("http://{}/other", ready.addr)]).await;

    assert!(passed.is_ok(), "{:?}", passed.err());
    assert_eq!(
        failed.expect_err("503").to_string(),
        format!(
            "http://{}/other answered 503 Service Unavailable",
            ready.addr
        )
    );
}
