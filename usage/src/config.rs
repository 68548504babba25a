//! Usage's settings, from flags or the environment (DESIGN §9).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};

/// Runtime settings for usage. Every field can be set from the environment; secrets may instead be read
/// from a file named by the `*_FILE` variable.
#[derive(Clone, clap::Parser)] // no Debug: the Redis URL and the token are secrets
#[command(
    name = "usage",
    about = "paygate usage: exact admission (rate, quota, credits) in Redis",
    after_help = "Logging: RUST_LOG sets the log filter (default `info`); LOG_FORMAT is `text` (default) or `json`.\nTracing: OTEL_EXPORTER_OTLP_ENDPOINT turns on OTLP trace export (gRPC), off when unset."
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "USAGE_LISTEN_ADDR",
        value_name = "USAGE_LISTEN_ADDR",
        default_value = "0.0.0.0:50052"
    )]
    pub listen_addr: SocketAddr,
    /// Address Prometheus scrapes `/metrics` on.
    #[arg(
        long,
        env = "USAGE_METRICS_ADDR",
        value_name = "USAGE_METRICS_ADDR",
        default_value = "0.0.0.0:9102"
    )]
    pub metrics_addr: SocketAddr,
    /// Redis URL (required, or REDIS_URL_FILE), e.g. redis://127.0.0.1:6379.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// File holding the Redis URL.
    #[arg(long, env = "REDIS_URL_FILE", value_name = "REDIS_URL_FILE")]
    pub redis_url_file: Option<PathBuf>,
    /// Where billing's gRPC API is.
    #[arg(
        long,
        env = "BILLING_URL",
        value_name = "BILLING_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub billing_url: String,
    /// Bearer token usage requires of its callers and sends to billing (required, or
    /// PAYGATE_SERVICE_TOKEN_FILE; at least 16 characters).
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
    /// Prefix of every Redis key usage writes (several deployments can share one Redis).
    #[arg(
        long,
        env = "USAGE_KEY_PREFIX",
        value_name = "USAGE_KEY_PREFIX",
        default_value = "paygate"
    )]
    pub key_prefix: String,
    /// How often spending is reported to billing, in milliseconds.
    #[arg(
        long,
        env = "USAGE_REPORT_INTERVAL_MS",
        value_name = "USAGE_REPORT_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub report_interval_ms: u64,
    /// How often credit mirrors are compared with billing's ledger (and repaired toward it), in
    /// milliseconds; also once at start.
    #[arg(
        long,
        env = "USAGE_RECONCILE_INTERVAL_MS",
        value_name = "USAGE_RECONCILE_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub reconcile_interval_ms: u64,
    /// Lifetime of a lease granted to a gateway, in milliseconds: how long units and rate-limit slots may
    /// stay reserved for one gateway without a round trip.
    #[arg(
        long,
        env = "USAGE_LEASE_TTL_MS",
        value_name = "USAGE_LEASE_TTL_MS",
        default_value_t = 2000
    )]
    pub lease_ttl_ms: u64,
    /// How long after its deadline an unreturned lease is written off, in milliseconds (its units are
    /// then never admitted again in their period, and never billed).
    #[arg(
        long,
        env = "USAGE_LEASE_GRACE_MS",
        value_name = "USAGE_LEASE_GRACE_MS",
        default_value_t = 1000
    )]
    pub lease_grace_ms: u64,
    /// How long an admission waits for recalled leases to come back before it decides without them, in
    /// milliseconds (at most 200: the wait adds to that request's latency).
    #[arg(
        long,
        env = "USAGE_RECALL_WAIT_MS",
        value_name = "USAGE_RECALL_WAIT_MS",
        default_value_t = 100
    )]
    pub recall_wait_ms: u64,
    /// Start even when Redis keeps no append-only file or may evict keys (development only: a Redis
    /// restart then forgets counters, and eviction can forget spending).
    #[arg(long, env = "USAGE_ALLOW_VOLATILE_REDIS", default_value_t = false)]
    pub allow_volatile_redis: bool,

    // TLS (DESIGN §9): the gRPC server, the link to billing, and Redis.
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
    /// CA certificate(s) (PEM) billing's certificate is verified with when BILLING_URL is https://
    /// (default: the system roots).
    #[arg(
        long,
        env = "PAYGATE_GRPC_CA_FILE",
        value_name = "PAYGATE_GRPC_CA_FILE"
    )]
    pub grpc_ca_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) Redis's certificate is verified with when REDIS_URL is rediss://
    /// (default: the system roots).
    #[arg(long, env = "REDIS_CA_FILE", value_name = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
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

    /// Returns the CA billing's certificate is verified with (`None`: the system roots).
    pub fn grpc_ca(&self) -> anyhow::Result<Option<tonic::transport::Certificate>> {
        self.grpc_ca_file
            .as_deref()
            .map(proto::tls::read_ca)
            .transpose()
            .context("PAYGATE_GRPC_CA_FILE")
    }
}

/// The secrets of a `Config`, resolved from their values or files.
pub struct Secrets {
    pub redis_url: String,
    pub service_token: String,
}

impl Config {
    /// Resolves each secret from its variable or its `*_FILE`; the error names the variable to set.
    pub fn secrets(&self) -> anyhow::Result<Secrets> {
        let redis_url = resolve_secret("REDIS_URL", &self.redis_url, &self.redis_url_file)?;
        let service_token = resolve_secret(
            "PAYGATE_SERVICE_TOKEN",
            &self.service_token,
            &self.service_token_file,
        )?;
        check_token("PAYGATE_SERVICE_TOKEN", &service_token)?;
        Ok(Secrets {
            redis_url,
            service_token,
        })
    }

    /// Returns the report interval.
    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(self.report_interval_ms.max(10))
    }

    /// Returns the lease settings; fails when USAGE_RECALL_WAIT_MS is above 200 or the lease lifetime is
    /// zero.
    pub fn lease_settings(&self) -> anyhow::Result<crate::LeaseSettings> {
        if self.recall_wait_ms > MAX_RECALL_WAIT_MS {
            bail!("USAGE_RECALL_WAIT_MS must be at most {MAX_RECALL_WAIT_MS}");
        }
        if self.lease_ttl_ms == 0 {
            bail!("USAGE_LEASE_TTL_MS must be positive");
        }
        Ok(crate::LeaseSettings {
            ttl: Duration::from_millis(self.lease_ttl_ms),
            grace: Duration::from_millis(self.lease_grace_ms),
            recall_wait: Duration::from_millis(self.recall_wait_ms),
        })
    }

    /// Returns the credit mirror reconciliation interval.
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms.max(100))
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

/// The longest USAGE_RECALL_WAIT_MS accepted: the wait adds to the latency of the request that recalls.
const MAX_RECALL_WAIT_MS: u64 = 200;

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
    use clap::Parser;

    use super::*;

    #[test]
    fn lease_settings_default_to_the_documented_values() {
        let config = Config::try_parse_from(["usage"]).expect("defaults parse");

        let settings = config.lease_settings().expect("defaults are valid");

        assert_eq!(settings, crate::LeaseSettings::default());
        assert_eq!(settings.ttl, Duration::from_millis(2000));
        assert_eq!(settings.grace, Duration::from_millis(1000));
        assert_eq!(settings.recall_wait, Duration::from_millis(100));
    }

    #[test]
    fn a_recall_wait_above_200_ms_is_refused() {
        let config = Config::try_parse_from(["usage", "--recall-wait-ms", "201"]).expect("parses");

        let refusal = config.lease_settings().expect_err("refused");

        assert!(refusal.to_string().contains("USAGE_RECALL_WAIT_MS"));
    }
}
