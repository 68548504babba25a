//! The gateway's settings, from flags or the environment (DESIGN §9); routes come from `GATEWAY_CONFIG`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};

/// Runtime settings for the gateway. Every field can be set from the environment; the token may instead
/// be read from a file named by `PAYGATE_SERVICE_TOKEN_FILE`.
#[derive(Clone, clap::Parser)] // no Debug: the token is a secret
#[command(
    name = "gateway",
    about = "paygate gateway: forwards paid requests, answers 401/402/403/429/503 otherwise",
    after_help = "Logging: RUST_LOG sets the log filter (default `info`); LOG_FORMAT is `text` (default) or `json`.\nTracing: OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP trace export (gRPC), off when unset."
)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(
        long,
        env = "GATEWAY_LISTEN_ADDR",
        value_name = "GATEWAY_LISTEN_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub listen_addr: SocketAddr,
    /// Address Prometheus scrapes `/metrics` on.
    #[arg(
        long,
        env = "GATEWAY_METRICS_ADDR",
        value_name = "GATEWAY_METRICS_ADDR",
        default_value = "0.0.0.0:9100"
    )]
    pub metrics_addr: SocketAddr,
    /// The routes file (TOML): prefixes, upstreams, prices, failure modes, limits (required). SIGHUP
    /// reloads its routes.
    // Optional here so that its absence is one line naming GATEWAY_CONFIG (see `routes_path`), not clap's
    // usage block.
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "GATEWAY_CONFIG")]
    pub routes_file: Option<PathBuf>,
    /// Where billing's gRPC API is.
    #[arg(
        long,
        env = "BILLING_URL",
        value_name = "BILLING_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub billing_url: String,
    /// Where usage's gRPC API is.
    #[arg(
        long,
        env = "USAGE_URL",
        value_name = "USAGE_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub usage_url: String,
    /// Bearer token sent to billing and usage (required, or PAYGATE_SERVICE_TOKEN_FILE).
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
    /// Deadline of each call to billing or usage on the request path, in milliseconds.
    #[arg(
        long,
        env = "GATEWAY_BACKEND_DEADLINE_MS",
        value_name = "GATEWAY_BACKEND_DEADLINE_MS",
        default_value_t = 250
    )]
    pub backend_deadline_ms: u64,
    /// `on`: hot customers are admitted from leases, spent in memory (docs/leases.md); `off`: every
    /// request is admitted by usage.
    #[arg(
        long,
        env = "GATEWAY_LEASES",
        value_name = "GATEWAY_LEASES",
        value_enum,
        default_value_t = Leases::On
    )]
    pub leases: Leases,
    /// How often per-customer statistics are reported to billing, in milliseconds.
    #[arg(
        long,
        env = "GATEWAY_STATS_INTERVAL_MS",
        value_name = "GATEWAY_STATS_INTERVAL_MS",
        default_value_t = 10_000
    )]
    pub stats_interval_ms: u64,
    /// PEM certificate chain (leaf first) to serve HTTPS with, h2 and HTTP/1.1 by ALPN; with
    /// GATEWAY_TLS_KEY_FILE. Both files are checked every few seconds and a new pair is used without a
    /// restart. Unset: plain HTTP.
    #[arg(
        long,
        env = "GATEWAY_TLS_CERT_FILE",
        value_name = "GATEWAY_TLS_CERT_FILE"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of GATEWAY_TLS_CERT_FILE.
    #[arg(
        long,
        env = "GATEWAY_TLS_KEY_FILE",
        value_name = "GATEWAY_TLS_KEY_FILE"
    )]
    pub tls_key_file: Option<PathBuf>,

    // TLS to billing and usage (DESIGN §9).
    /// CA certificate(s) (PEM) billing's and usage's certificates are verified with when BILLING_URL or
    /// USAGE_URL is https:// (default: the system roots).
    #[arg(
        long,
        env = "PAYGATE_GRPC_CA_FILE",
        value_name = "PAYGATE_GRPC_CA_FILE"
    )]
    pub grpc_ca_file: Option<PathBuf>,
}

impl Config {
    /// Returns the CA billing's and usage's certificates are verified with (`None`: the system roots).
    pub fn grpc_ca(&self) -> anyhow::Result<Option<tonic::transport::Certificate>> {
        self.grpc_ca_file
            .as_deref()
            .map(proto::tls::read_ca)
            .transpose()
            .context("PAYGATE_GRPC_CA_FILE")
    }

    /// Returns the service token from its variable or file.
    pub fn service_token(&self) -> anyhow::Result<String> {
        let token = match (&self.service_token, &self.service_token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| {
                    format!(
                        "failed to read PAYGATE_SERVICE_TOKEN_FILE `{}`",
                        path.display()
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            (None, None) => {
                bail!("PAYGATE_SERVICE_TOKEN is required (or PAYGATE_SERVICE_TOKEN_FILE)")
            }
        };
        check_token("PAYGATE_SERVICE_TOKEN", &token)?;
        Ok(token)
    }

    /// Returns the listener's certificate and key when HTTPS is configured, `None` for plain HTTP; fails
    /// when only one of the two files is set, or when they cannot be used.
    pub fn server_tls(&self) -> anyhow::Result<Option<crate::tls::ServerTls>> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => Ok(None),
            (Some(cert_file), Some(key_file)) => crate::tls::ServerTls::load(cert_file, key_file)
                .map(Some)
                .context("GATEWAY_TLS_CERT_FILE/GATEWAY_TLS_KEY_FILE"),
            (Some(_), None) => {
                bail!(
                    "GATEWAY_TLS_CERT_FILE is set without GATEWAY_TLS_KEY_FILE; set both or neither"
                )
            }
            (None, Some(_)) => {
                bail!(
                    "GATEWAY_TLS_KEY_FILE is set without GATEWAY_TLS_CERT_FILE; set both or neither"
                )
            }
        }
    }

    /// Returns the path of the routes file; fails, naming `GATEWAY_CONFIG`, when none is given.
    pub fn routes_path(&self) -> anyhow::Result<&Path> {
        self.routes_file
            .as_deref()
            .context("GATEWAY_CONFIG is required (or --routes-file): the routes file (TOML)")
    }

    /// Returns how often customer statistics are reported.
    pub fn stats_interval(&self) -> Duration {
        Duration::from_millis(self.stats_interval_ms.max(100))
    }

    /// Returns the backend deadline.
    pub fn backend_deadline(&self) -> Duration {
        Duration::from_millis(self.backend_deadline_ms.max(1))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_placeholder_tokens_are_refused_by_name() {
        let short = check_token("PAYGATE_SERVICE_TOKEN", "short").expect_err("short");
        let placeholder = check_token(
            "PAYGATE_SERVICE_TOKEN",
            "change-me-service-token-0123456789",
        )
        .expect_err("placeholder");

        assert_eq!(
            short.to_string(),
            "PAYGATE_SERVICE_TOKEN must be at least 16 characters"
        );
        assert!(
            placeholder
                .to_string()
                .starts_with("PAYGATE_SERVICE_TOKEN is a placeholder")
        );
        assert!(check_token("PAYGATE_SERVICE_TOKEN", "a-random-token-of-some-length").is_ok());
    }
}

/// Whether the gateway admits hot customers from leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Leases {
    On,
    Off,
}
