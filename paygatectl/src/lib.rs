//! paygatectl: the command-line client of billing's admin API (`billing.v1.BillingAdmin`). Readable tables
//! by default, `--json` for scripts, `--quiet` to print only the id of what was created.
//!
//! Layout: this file holds the command line and the calls; `resolve` turns plan codes and customer external
//! ids into ids and billing's field names into flags; `output` renders answers as tables or JSON; `health`
//! holds the container healthchecks.

pub mod health;
pub mod output;
mod resolve;

use std::{io::Write, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

use proto::billing::v1::{self as pb, billing_admin_client::BillingAdminClient};

use crate::{
    output::{Format, Render},
    resolve::Failure,
};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "paygatectl",
    version,
    about = "Administer paygate billing: customers, plans, subscriptions, payments, credits, keys",
    after_help = "Where an id is asked for, a customer's external id or a plan's code works too.\n\
                  Set PAYGATE_ADMIN_URL and PAYGATE_ADMIN_TOKEN once instead of passing --url and --token."
)]
pub struct Cli {
    /// Where billing's admin API is; or set PAYGATE_ADMIN_URL.
    #[arg(
        long,
        env = "PAYGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:50051",
        global = true,
        help_heading = "Connection"
    )]
    pub url: String,
    /// The admin token (billing's BILLING_ADMIN_TOKEN); or set PAYGATE_ADMIN_TOKEN.
    #[arg(
        long,
        env = "PAYGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Connection"
    )]
    pub token: Option<String>,
    /// CA certificate(s) (PEM) billing's certificate is verified with when --url is https:// (default: the
    /// system roots).
    #[arg(
        long,
        env = "PAYGATE_GRPC_CA_FILE",
        global = true,
        help_heading = "Connection"
    )]
    pub ca_file: Option<std::path::PathBuf>,
    /// Who is acting, for the audit log; or set PAYGATE_ACTOR.
    #[arg(
        long,
        env = "PAYGATE_ACTOR",
        global = true,
        help_heading = "Connection"
    )]
    pub actor: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true, conflicts_with = "quiet")]
    pub json: bool,
    /// Print only the id of what was created or changed.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Customers: create, get, list.
    #[command(subcommand)]
    Customers(CustomerCommand),
    /// Plans: create, list, archive.
    #[command(subcommand)]
    Plans(PlanCommand),
    /// Subscriptions: create, show, change plan, cancel.
    #[command(subcommand)]
    Subscriptions(SubscriptionCommand),
    /// Payments: record a succeeded or failed payment.
    #[command(subcommand)]
    Payments(PaymentCommand),
    /// Prepaid credits: grant, adjust, balance, ledger.
    #[command(subcommand)]
    Credits(CreditCommand),
    /// API keys: issue, list, revoke, rotate.
    #[command(subcommand)]
    Keys(KeyCommand),
    /// Usage billing has been told about, per period.
    Usage(CustomerArg),
    /// Runtime statistics per hour: answers, upstream results, spending, upstream latency.
    Stats(StatsArgs),
    /// The audit log, newest first.
    Audit(AuditArgs),
    /// Healthchecks for containers: exit 0 only when the service is serving.
    #[command(subcommand)]
    Health(health::HealthCommand),
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Customer id or external id.
    #[arg(long)]
    pub customer: String,
    /// How many hours back from now (at most 744, 31 days).
    #[arg(long, default_value_t = 24, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=744))]
    pub hours: u32,
}

#[derive(Debug, Args)]
pub struct CustomerArg {
    /// Customer id or external id.
    #[arg(long)]
    pub customer: String,
}

#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Create a customer.
    Create {
        /// Your own identifier for the customer (unique).
        #[arg(long)]
        external_id: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "")]
        email: String,
        /// ISO 4217 code.
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// Show one customer.
    Get {
        /// Customer id or external id.
        #[arg(value_name = "CUSTOMER")]
        id: String,
    },
    /// List customers, oldest first.
    List {
        #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = parse_count)]
        page_size: u32,
        /// Token printed after the previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Interval {
    Day,
    Week,
    Month,
    Year,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Overage {
    /// Refuse requests beyond the quota (402 quota_exhausted).
    Block,
    /// Pay requests beyond the quota from prepaid credits.
    Credits,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Create a plan.
    Create {
        /// Stable machine name (a-z, 0-9, _ and -).
        #[arg(long)]
        code: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "USD")]
        currency: String,
        /// Price of one period, in currency units (`29` or `29.99`); 0 makes a free plan.
        #[arg(long, default_value = "0", allow_negative_numbers = true, value_parser = parse_price)]
        price: i64,
        #[arg(long, value_enum, default_value_t = Interval::Month)]
        interval: Interval,
        /// Units included per period.
        #[arg(long, allow_negative_numbers = true, value_parser = parse_units)]
        included_units: i64,
        /// At most this many requests per --rate-period-ms (0: no rate limit).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        rate_limit: u32,
        #[arg(long, default_value_t = 1000, allow_negative_numbers = true, value_parser = parse_count)]
        rate_period_ms: u32,
        /// Requests allowed at once on top of the steady rate (default 1 when rate limited).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        burst: u32,
        #[arg(long, value_enum, default_value_t = Overage::Block)]
        overage: Overage,
        /// Price of one unit beyond the quota, from credits (`0.001`); only with --overage credits.
        #[arg(long, default_value = "0", allow_negative_numbers = true, value_parser = parse_price)]
        unit_price: i64,
        /// How long a late payment keeps being served, in seconds.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        grace_seconds: u32,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        trial_days: u32,
        /// A feature the plan grants (repeatable).
        #[arg(long = "feature")]
        features: Vec<String>,
    },
    /// List plans.
    List {
        /// Include archived plans.
        #[arg(long)]
        all: bool,
    },
    /// Archive a plan: no new subscriptions; existing ones keep it.
    Archive {
        /// Plan id or code.
        #[arg(value_name = "PLAN")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Subscribe a customer to a plan.
    Create {
        /// Customer id or external id.
        #[arg(long)]
        customer: String,
        /// Plan id or code.
        #[arg(long)]
        plan: String,
    },
    /// Show a customer's live subscription.
    Show(CustomerArg),
    /// Move a subscription to another plan, now.
    ChangePlan {
        /// Subscription id.
        id: String,
        /// Plan id or code.
        #[arg(long)]
        plan: String,
    },
    /// Cancel a subscription now, or at the end of its period.
    Cancel {
        /// Subscription id.
        id: String,
        #[arg(long)]
        at_period_end: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Purpose {
    /// Pays the customer's subscription for its next period.
    Subscription,
    /// Buys prepaid credits.
    TopUp,
}

#[derive(Debug, Subcommand)]
pub enum PaymentCommand {
    /// Record a payment your payment provider took (or failed to take).
    Record {
        /// Customer id or external id.
        #[arg(long)]
        customer: String,
        #[arg(long, value_enum)]
        purpose: Purpose,
        /// Amount in currency units (`29.99`).
        #[arg(long, allow_negative_numbers = true, value_parser = parse_positive_amount)]
        amount: i64,
        /// Unique per payment, such as the provider's charge id; retrying with it is safe.
        #[arg(long)]
        idempotency_key: String,
        /// The payment failed (a subscription becomes past due).
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, default_value = "")]
        provider_reference: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditCommand {
    /// Grant credits without a payment.
    Grant {
        /// Customer id or external id.
        #[arg(long)]
        customer: String,
        /// Amount in currency units (`12.50`); to take credits away use `credits adjust`.
        #[arg(long, allow_negative_numbers = true, value_parser = parse_positive_amount)]
        amount: i64,
        /// Unique reference; granting twice with it applies once.
        #[arg(long)]
        reference: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Correct a balance up or down (never below zero).
    Adjust {
        /// Customer id or external id.
        #[arg(long)]
        customer: String,
        /// Signed amount in currency units (`-5` or `2.50`).
        #[arg(long, allow_negative_numbers = true, value_parser = parse_nonzero_amount)]
        amount: i64,
        #[arg(long)]
        reference: String,
        /// Why (required).
        #[arg(long)]
        note: String,
    },
    /// Show a customer's balance.
    Balance(CustomerArg),
    /// List a customer's ledger entries.
    Ledger(CustomerArg),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Issue a key; its secret is printed this once.
    Issue {
        /// Customer id or external id.
        #[arg(long)]
        customer: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List a customer's keys (prefixes only).
    List(CustomerArg),
    /// Revoke a key at once.
    Revoke {
        /// Key id.
        id: String,
    },
    /// Replace a key; the old one keeps working for --grace-seconds.
    Rotate {
        /// Key id.
        id: String,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = parse_count)]
        grace_seconds: u32,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only events about this id (a customer's external id or a plan's code works too).
    #[arg(long, default_value = "")]
    pub target: String,
    #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = parse_count)]
    pub page_size: u32,
    /// Token printed after the previous page.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

/// Parses an amount in currency units (`29`, `29.99`, `-0.5`, `0.000001`) into micros.
pub fn parse_amount(text: &str) -> Result<i64, String> {
    let invalid = || format!("`{text}` is not an amount such as 29 or 29.99 (at most 6 decimals)");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || fraction.len() > 6
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|byte| byte.is_ascii_digit())
    {
        return Err(invalid());
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let fraction: i64 = format!("{fraction:0<6}").parse().map_err(|_| invalid())?;
    let micros = whole
        .checked_mul(1_000_000)
        .and_then(|value| value.checked_add(fraction))
        .ok_or_else(invalid)?;
    Ok(if negative { -micros } else { micros })
}

/// Parses an amount that must be above zero (a payment, a grant).
pub fn parse_positive_amount(text: &str) -> Result<i64, String> {
    match parse_amount(text)? {
        micros if micros > 0 => Ok(micros),
        _ => Err("must be positive".to_owned()),
    }
}

/// Parses a price, which may be zero (a free plan) but never negative.
pub fn parse_price(text: &str) -> Result<i64, String> {
    match parse_amount(text)? {
        micros if micros >= 0 => Ok(micros),
        _ => Err("must not be negative".to_owned()),
    }
}

/// Parses a signed correction, which must change something.
pub fn parse_nonzero_amount(text: &str) -> Result<i64, String> {
    match parse_amount(text)? {
        0 => Err("must not be zero".to_owned()),
        micros => Ok(micros),
    }
}

/// Parses a count of units (`0` or more).
pub fn parse_units(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(units) if units >= 0 => Ok(units),
        Ok(_) => Err("must not be negative".to_owned()),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// Parses a small count (`0` to 4294967295), saying so when it is negative rather than "invalid digit".
pub fn parse_count(text: &str) -> Result<u32, String> {
    match text.parse::<i64>() {
        Ok(count) if count < 0 => Err("must not be negative".to_owned()),
        Ok(count) => u32::try_from(count).map_err(|_| format!("must be at most {}", u32::MAX)),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// What went wrong, worded for a person at a terminal.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("no admin token: set PAYGATE_ADMIN_TOKEN (or pass --token)")]
    NoToken,
    #[error("the admin token is not valid in a header")]
    BadToken,
    #[error("`{0}` is not a valid URL")]
    BadUrl(String),
    #[error("billing is unreachable at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error(
        "billing at {url} presented a TLS certificate that was not trusted (check --ca-file): {reason}"
    )]
    UntrustedCertificate { url: String, reason: String },
    #[error("--ca-file: {0}")]
    BadCaFile(String),
    #[error("billing refused the admin token (check PAYGATE_ADMIN_TOKEN)")]
    Unauthenticated,
    #[error("{0}")]
    Rejected(String),
    /// A plan code, customer external id or id that names nothing; `flag` is where it was given.
    #[error("{flag}: no {kind} has the {what} `{value}`")]
    NoMatch {
        flag: &'static str,
        kind: &'static str,
        what: &'static str,
        value: String,
    },
    /// A healthcheck that failed: not serving, an error status, or no answer.
    #[error("{0}")]
    Unhealthy(String),
    #[error("failed to write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Words billing's refusal for a person: field names become the flags they came from, micros become
/// amounts in `currency` (when known).
fn rejected(status: Status, url: &str, currency: Option<&str>) -> CtlError {
    let message = resolve::in_flags(status.message(), currency);
    match status.code() {
        Code::Unauthenticated => CtlError::Unauthenticated,
        Code::Unavailable | Code::DeadlineExceeded => CtlError::Unreachable {
            url: url.to_owned(),
            detail: message,
        },
        // Billing's messages name the field (now the flag), so they say what is wrong on their own.
        Code::InvalidArgument => CtlError::Rejected(message),
        Code::NotFound => CtlError::Rejected(format!("not found: {message}")),
        Code::AlreadyExists => CtlError::Rejected(format!("already exists: {message}")),
        Code::FailedPrecondition => CtlError::Rejected(format!("not possible now: {message}")),
        code => CtlError::Rejected(format!("billing answered {code:?}: {message}")),
    }
}

struct Admin {
    client: BillingAdminClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
    actor: Option<MetadataValue<tonic::metadata::Ascii>>,
    url: String,
    /// The currency of the customer or plan the command is about, once known, for amounts in errors.
    currency: Option<String>,
}

impl Admin {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(Duration::from_secs(10));
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        if let Some(actor) = &self.actor {
            request
                .metadata_mut()
                .insert("paygate-actor", actor.clone());
        }
        request
    }
}

/// Runs one command, writing its answer to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<(), CtlError> {
    if let Command::Health(check) = &cli.command {
        return health::check(check).await;
    }
    let token = cli
        .token
        .clone()
        .filter(|token| !token.is_empty())
        .ok_or(CtlError::NoToken)?;
    let mut authorization: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| CtlError::BadToken)?;
    authorization.set_sensitive(true);
    let actor = match &cli.actor {
        Some(actor) => Some(
            actor
                .parse()
                .map_err(|_| CtlError::Rejected("--actor must be printable ASCII".into()))?,
        ),
        None => None,
    };
    let channel = connect(&cli.url, cli.ca_file.as_deref()).await?;
    let mut admin = Admin {
        client: BillingAdminClient::new(channel),
        authorization,
        actor,
        url: cli.url.clone(),
        currency: None,
    };
    let format = if cli.json {
        Format::Json
    } else if cli.quiet {
        Format::Quiet
    } else {
        Format::Table
    };
    let rendered = match execute(&mut admin, cli.command).await {
        Ok(rendered) => rendered,
        Err(Failure::Ctl(error)) => return Err(error),
        Err(Failure::Billing(status)) => {
            return Err(rejected(status, &admin.url, admin.currency.as_deref()));
        }
    };
    rendered.write(format, out)?;
    Ok(())
}

/// Connects to billing at `url`: plaintext for `http://`, TLS for `https://` verified against the CA in
/// `ca_file`, or the system roots.
async fn connect(url: &str, ca_file: Option<&std::path::Path>) -> Result<Channel, CtlError> {
    let ca = ca_file
        .map(proto::tls::read_ca)
        .transpose()
        .map_err(|error| CtlError::BadCaFile(error.to_string()))?;
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| CtlError::BadUrl(url.to_owned()))?
        .connect_timeout(Duration::from_secs(5));
    let endpoint =
        proto::tls::trust(endpoint, ca.as_ref()).map_err(|error| CtlError::Unreachable {
            url: url.to_owned(),
            detail: source_chain(&error),
        })?;
    endpoint
        .connect()
        .await
        .map_err(|error| match proto::tls::certificate_rejection(&error) {
            Some(reason) => CtlError::UntrustedCertificate {
                url: url.to_owned(),
                reason,
            },
            None => CtlError::Unreachable {
                url: url.to_owned(),
                detail: source_chain(&error),
            },
        })
}

pub(crate) fn source_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(current) = cause {
        parts.push(current.to_string());
        cause = current.source();
    }
    parts.dedup();
    parts.join(": ")
}

async fn execute(admin: &mut Admin, command: Command) -> Result<Render, Failure> {
    Ok(match command {
        Command::Customers(CustomerCommand::Create {
            external_id,
            name,
            email,
            currency,
        }) => {
            let message = pb::CreateCustomerRequest {
                external_id,
                name,
                email,
                currency,
            };
            Render::Customers(
                vec![
                    admin
                        .client
                        .create_customer(admin.request(message))
                        .await?
                        .into_inner(),
                ],
                String::new(),
            )
        }
        Command::Customers(CustomerCommand::Get { id }) => Render::Customers(
            vec![resolve::customer(admin, "<CUSTOMER>", &id).await?],
            String::new(),
        ),
        Command::Customers(CustomerCommand::List {
            page_size,
            page_token,
        }) => {
            let message = pb::ListCustomersRequest {
                page_size,
                page_token,
            };
            let page = admin
                .client
                .list_customers(admin.request(message))
                .await?
                .into_inner();
            Render::Customers(page.customers, page.next_page_token)
        }
        Command::Plans(PlanCommand::Create {
            code,
            name,
            currency,
            price,
            interval,
            included_units,
            rate_limit,
            rate_period_ms,
            burst,
            overage,
            unit_price,
            grace_seconds,
            trial_days,
            features,
        }) => {
            admin.currency = Some(currency.clone());
            let message = pb::CreatePlanRequest {
                code,
                name,
                currency,
                price_micros: price,
                interval: match interval {
                    Interval::Day => pb::BillingInterval::Day,
                    Interval::Week => pb::BillingInterval::Week,
                    Interval::Month => pb::BillingInterval::Month,
                    Interval::Year => pb::BillingInterval::Year,
                }
                .into(),
                included_units,
                rate_limit,
                rate_period_ms,
                burst,
                overage_mode: match overage {
                    Overage::Block => pb::OverageMode::Block,
                    Overage::Credits => pb::OverageMode::Credits,
                }
                .into(),
                unit_price_micros: unit_price,
                grace_period_seconds: grace_seconds,
                trial_days,
                features,
            };
            Render::Plans(vec![
                admin
                    .client
                    .create_plan(admin.request(message))
                    .await?
                    .into_inner(),
            ])
        }
        Command::Plans(PlanCommand::List { all }) => {
            let message = pb::ListPlansRequest {
                include_archived: all,
            };
            Render::Plans(
                admin
                    .client
                    .list_plans(admin.request(message))
                    .await?
                    .into_inner()
                    .plans,
            )
        }
        Command::Plans(PlanCommand::Archive { id }) => {
            let message = pb::ArchivePlanRequest {
                plan_id: resolve::plan_id(admin, "<PLAN>", &id).await?,
            };
            Render::Plans(vec![
                admin
                    .client
                    .archive_plan(admin.request(message))
                    .await?
                    .into_inner(),
            ])
        }
        Command::Subscriptions(SubscriptionCommand::Create { customer, plan }) => {
            let message = pb::CreateSubscriptionRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                plan_id: resolve::plan_id(admin, "--plan", &plan).await?,
            };
            Render::Subscription(
                admin
                    .client
                    .create_subscription(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Subscriptions(SubscriptionCommand::Show(CustomerArg { customer })) => {
            let message = pb::GetCustomerSubscriptionRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
            };
            Render::Subscription(
                admin
                    .client
                    .get_customer_subscription(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Subscriptions(SubscriptionCommand::ChangePlan { id, plan }) => {
            let message = pb::ChangeSubscriptionPlanRequest {
                subscription_id: id,
                plan_id: resolve::plan_id(admin, "--plan", &plan).await?,
            };
            Render::Subscription(
                admin
                    .client
                    .change_subscription_plan(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Subscriptions(SubscriptionCommand::Cancel { id, at_period_end }) => {
            let message = pb::CancelSubscriptionRequest {
                subscription_id: id,
                at_period_end,
            };
            Render::Subscription(
                admin
                    .client
                    .cancel_subscription(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Payments(PaymentCommand::Record {
            customer,
            purpose,
            amount,
            idempotency_key,
            failed,
            reason,
            provider_reference,
        }) => {
            let message = pb::RecordPaymentRequest {
                idempotency_key,
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                purpose: match purpose {
                    Purpose::Subscription => pb::PaymentPurpose::Subscription,
                    Purpose::TopUp => pb::PaymentPurpose::CreditTopUp,
                }
                .into(),
                outcome: if failed {
                    pb::PaymentOutcome::Failed
                } else {
                    pb::PaymentOutcome::Succeeded
                }
                .into(),
                amount_micros: amount,
                provider_reference,
                failure_reason: reason,
            };
            Render::Payment(
                admin
                    .client
                    .record_payment(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Credits(CreditCommand::Grant {
            customer,
            amount,
            reference,
            note,
        }) => {
            let message = pb::GrantCreditsRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                amount_micros: amount,
                reference,
                note,
            };
            Render::Ledger(
                vec![
                    admin
                        .client
                        .grant_credits(admin.request(message))
                        .await?
                        .into_inner(),
                ],
                String::new(),
            )
        }
        Command::Credits(CreditCommand::Adjust {
            customer,
            amount,
            reference,
            note,
        }) => {
            let message = pb::AdjustCreditsRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                delta_micros: amount,
                reference,
                note,
            };
            Render::Ledger(
                vec![
                    admin
                        .client
                        .adjust_credits(admin.request(message))
                        .await?
                        .into_inner(),
                ],
                String::new(),
            )
        }
        Command::Credits(CreditCommand::Balance(CustomerArg { customer })) => {
            let message = pb::GetCreditBalanceRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
            };
            Render::Balance(
                admin
                    .client
                    .get_credit_balance(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Credits(CreditCommand::Ledger(CustomerArg { customer })) => {
            let customer = resolve::customer_id(admin, "--customer", &customer).await?;
            let mut entries = Vec::new();
            let mut page_token = String::new();
            loop {
                let message = pb::ListLedgerEntriesRequest {
                    customer_id: customer.clone(),
                    page_size: 500,
                    page_token,
                };
                let page = admin
                    .client
                    .list_ledger_entries(admin.request(message))
                    .await?
                    .into_inner();
                entries.extend(page.entries);
                if page.next_page_token.is_empty() {
                    break Render::Ledger(entries, String::new());
                }
                page_token = page.next_page_token;
            }
        }
        Command::Keys(KeyCommand::Issue { customer, name }) => {
            let message = pb::IssueApiKeyRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                name,
            };
            Render::IssuedKey(
                admin
                    .client
                    .issue_api_key(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Keys(KeyCommand::List(CustomerArg { customer })) => {
            let message = pb::ListApiKeysRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
            };
            Render::Keys(
                admin
                    .client
                    .list_api_keys(admin.request(message))
                    .await?
                    .into_inner()
                    .keys,
            )
        }
        Command::Keys(KeyCommand::Revoke { id }) => {
            let message = pb::RevokeApiKeyRequest { key_id: id };
            Render::Keys(vec![
                admin
                    .client
                    .revoke_api_key(admin.request(message))
                    .await?
                    .into_inner(),
            ])
        }
        Command::Keys(KeyCommand::Rotate { id, grace_seconds }) => {
            let message = pb::RotateApiKeyRequest {
                key_id: id,
                grace_seconds,
            };
            Render::IssuedKey(
                admin
                    .client
                    .rotate_api_key(admin.request(message))
                    .await?
                    .into_inner(),
            )
        }
        Command::Usage(CustomerArg { customer }) => {
            let message = pb::GetCustomerUsageRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                max_periods: 0,
            };
            Render::Usage(
                admin
                    .client
                    .get_customer_usage(admin.request(message))
                    .await?
                    .into_inner()
                    .periods,
            )
        }
        Command::Stats(StatsArgs { customer, hours }) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|since| since.as_secs() as i64)
                .unwrap_or(0);
            let message = pb::GetCustomerStatsRequest {
                customer_id: resolve::customer_id(admin, "--customer", &customer).await?,
                from: Some(prost_types::Timestamp {
                    seconds: now - i64::from(hours) * 3600,
                    nanos: 0,
                }),
                to: Some(prost_types::Timestamp {
                    seconds: now + 1,
                    nanos: 0,
                }),
            };
            Render::Stats(
                admin
                    .client
                    .get_customer_stats(admin.request(message))
                    .await?
                    .into_inner()
                    .hours,
            )
        }
        Command::Health(_) => unreachable!("`run` answers healthchecks without billing"),
        Command::Audit(AuditArgs {
            target,
            page_size,
            page_token,
        }) => {
            let message = pb::ListAuditEventsRequest {
                target_id: resolve::audit_target(admin, &target).await?,
                page_size,
                page_token,
            };
            let page = admin
                .client
                .list_audit_events(admin.request(message))
                .await?
                .into_inner();
            Render::Audit(page.events, page.next_page_token)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_read_as_currency_units_into_micros() {
        assert_eq!(parse_amount("29"), Ok(29_000_000));
        assert_eq!(parse_amount("29.99"), Ok(29_990_000));
        assert_eq!(parse_amount("0.000001"), Ok(1));
        assert_eq!(parse_amount("-2.5"), Ok(-2_500_000));
        assert_eq!(parse_amount(".5"), Ok(500_000));
        assert!(parse_amount("1.0000001").is_err());
        assert!(parse_amount("1e3").is_err());
        assert!(parse_amount("").is_err());
        assert!(parse_amount("-").is_err());
    }

    #[test]
    fn every_subcommand_has_help() {
        use clap::CommandFactory;

        Cli::command().debug_assert();
    }
}
