//! Billing's settings, from flags or the environment (DESIGN §9).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, bail};

/// Runtime settings for billing. Every field can be set from the environment; secrets may instead be read
/// from a file named by the `*_FILE` variable.
#[derive(Clone, clap::Parser)] // no Debug: the database URL and tokens are secrets
#[command(
    name = "billing",
    about = "paygate billing: customers, plans, subscriptions, payments, credits, keys",
    after_help = "Logging: RUST_LOG sets the log filter (default `info`); LOG_FORMAT is `text` (default) or `json`.\nTracing: OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP trace export (gRPC), off when unset."
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "BILLING_LISTEN_ADDR",
        value_name = "BILLING_LISTEN_ADDR",
        default_value = "0.0.0.0:50051"
    )]
    pub listen_addr: SocketAddr,
    /// Address Prometheus scrapes `/metrics` on.
    #[arg(
        long,
        env = "BILLING_METRICS_ADDR",
        value_name = "BILLING_METRICS_ADDR",
        default_value = "0.0.0.0:9101"
    )]
    pub metrics_addr: SocketAddr,
    /// PostgreSQL connection string (required, or DATABASE_URL_FILE).
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// File holding the PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL_FILE", value_name = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// Bearer token the admin API requires (required, or BILLING_ADMIN_TOKEN_FILE; at least 16 characters).
    #[arg(
        long,
        env = "BILLING_ADMIN_TOKEN",
        value_name = "BILLING_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(
        long,
        env = "BILLING_ADMIN_TOKEN_FILE",
        value_name = "BILLING_ADMIN_TOKEN_FILE"
    )]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token the internal Entitlements API requires (required, or PAYGATE_SERVICE_TOKEN_FILE; at
    /// least 16 characters, different from the admin token).
    #[arg(
        long,
        env = "PAYGATE_SERVICE_TOKEN",
        value_name = "PAYGATE_SERVICE_TOKEN",
        hide_env_values = true
    )]
    pub service_token: Option<String>,
    /// File holding the service token.
    #[arg(
        long,
        env = "PAYGATE_SERVICE_TOKEN_FILE",
        value_name = "PAYGATE_SERVICE_TOKEN_FILE"
    )]
    pub service_token_file: Option<PathBuf>,
    /// PostgreSQL password, used instead of any password in DATABASE_URL, so that it may hold any
    /// character without URL escaping (or DATABASE_PASSWORD_FILE).
    #[arg(
        long,
        env = "DATABASE_PASSWORD",
        value_name = "DATABASE_PASSWORD",
        hide_env_values = true
    )]
    pub database_password: Option<String>,
    /// File holding the PostgreSQL password.
    #[arg(
        long,
        env = "DATABASE_PASSWORD_FILE",
        value_name = "DATABASE_PASSWORD_FILE"
    )]
    pub database_password_file: Option<PathBuf>,
    /// Largest number of PostgreSQL connections billing holds.
    #[arg(
        long,
        env = "BILLING_DB_MAX_CONNECTIONS",
        value_name = "BILLING_DB_MAX_CONNECTIONS",
        default_value_t = 20
    )]
    pub db_max_connections: u32,

    // TLS of the gRPC server (DESIGN §9).
    /// Certificate chain (PEM) the gRPC server presents; with PAYGATE_GRPC_TLS_KEY_FILE it serves TLS only.
    /// Plaintext when both are unset.
    #[arg(
        long,
        env = "PAYGATE_GRPC_TLS_CERT_FILE",
        value_name = "PAYGATE_GRPC_TLS_CERT_FILE"
    )]
    pub grpc_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of PAYGATE_GRPC_TLS_CERT_FILE.
    #[arg(
        long,
        env = "PAYGATE_GRPC_TLS_KEY_FILE",
        value_name = "PAYGATE_GRPC_TLS_KEY_FILE"
    )]
    pub grpc_tls_key_file: Option<PathBuf>,
}

impl Config {
    /// Returns the TLS the gRPC server serves (`None`: plaintext); fails when only one of the two files is
    /// set or either cannot be used, naming the variable.
    pub fn grpc_tls(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        Ok(proto::tls::server_config_from_settings(
            self.grpc_tls_cert_file.as_deref(),
            self.grpc_tls_key_file.as_deref(),
        )?)
    }
}

/// The secrets of a `Config`, resolved from their values or files and checked.
pub struct Secrets {
    pub database_url: String,
    /// The password from DATABASE_PASSWORD or its file; `None`: DATABASE_URL's own, if any.
    pub database_password: Option<String>,
    pub tokens: crate::Tokens,
}

impl Config {
    /// Resolves each secret from its variable or its `*_FILE`, and checks the tokens; the error names the
    /// variable to set.
    pub fn secrets(&self) -> anyhow::Result<Secrets> {
        let database_url =
            resolve_secret("DATABASE_URL", &self.database_url, &self.database_url_file)?;
        let admin = resolve_secret(
            "BILLING_ADMIN_TOKEN",
            &self.admin_token,
            &self.admin_token_file,
        )?;
        let service = resolve_secret(
            "PAYGATE_SERVICE_TOKEN",
            &self.service_token,
            &self.service_token_file,
        )?;
        for (name, token) in [
            ("BILLING_ADMIN_TOKEN", &admin),
            ("PAYGATE_SERVICE_TOKEN", &service),
        ] {
            check_token(name, token)?;
        }
        if admin == service {
            bail!("BILLING_ADMIN_TOKEN and PAYGATE_SERVICE_TOKEN must differ");
        }
        let database_password = match (&self.database_password, &self.database_password_file) {
            (None, None) => None,
            (value, file) => Some(resolve_secret("DATABASE_PASSWORD", value, file)?),
        };
        Ok(Secrets {
            database_url,
            database_password,
            tokens: crate::Tokens { admin, service },
        })
    }
}

fn resolve_secret(
    name: &str,
    value: &Option<String>,
    file: &Option<PathBuf>,
) -> anyhow::Result<String> {
    let secret = match (value, file) {
        (Some(value), _) => value.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {name}_FILE `{}`", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        (None, None) => bail!("{name} is required (or {name}_FILE)"),
    };
    if secret.is_empty() {
        bail!("{name} is empty");
    }
    Ok(secret)
}

/// Tokens shorter than this are refused at start (DESIGN §9).
const MIN_TOKEN_CHARS: usize = 16;
/// Values starting with this are `.env.example`'s placeholders, publicly known, and refused at start.
const PLACEHOLDER_PREFIX: &str = "change-me";

/// Refuses a token left at a placeholder or shorter than `MIN_TOKEN_CHARS`; the error names `name`.
fn check_token(name: &str, token: &str) -> anyhow::Result<()> {
    if token.starts_with(PLACEHOLDER_PREFIX) {
        bail!("{name} is a placeholder (starts with `{PLACEHOLDER_PREFIX}`): set a random value");
    }
    if token.chars().count() < MIN_TOKEN_CHARS {
        bail!("{name} must be at least {MIN_TOKEN_CHARS} characters");
    }
    Ok(())
}
