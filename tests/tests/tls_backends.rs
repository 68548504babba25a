//! TLS between paygate and its own backends: billing over a PostgreSQL that requires verified TLS, usage
//! over `rediss://`, the gateway and usage calling billing and usage over gRPC with TLS, and paygatectl
//! against a TLS billing. Every certificate comes from a CA made in the test, and every "wrong CA" case
//! is refused with an error that says the certificate was not trusted and names the setting to fix.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Parser;
use http::StatusCode;
use integration_tests::{
    ADMIN_TOKEN, BearerToken, SERVICE_TOKEN, channel_trusting, customer_request, fresh_database,
    get, http_client, redis_url, send, spawn_billing, spawn_billing_with_tls, spawn_ok_upstream,
    spawn_restartable_postgres, spawn_tls_postgres, spawn_tls_redis, tls::TestCa, unique_prefix,
};
use proto::billing::v1::{
    CreateSubscriptionRequest, IssueApiKeyRequest, billing_admin_client::BillingAdminClient,
};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use time::OffsetDateTime;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::{Certificate, ServerTlsConfig};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long a test waits for a condition it polls; generous for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(10);

fn routes(upstream: SocketAddr) -> String {
    format!(
        r#"
        [[routes]]
        prefix = "/v1"
        upstream = "http://{upstream}"
        "#
    )
}

fn grpc_tls(ca: &TestCa) -> ServerTlsConfig {
    let cert = ca.issue("grpc", &["localhost", "127.0.0.1"]);
    proto::tls::server_config(&cert.cert_file, &cert.key_file).expect("a usable certificate")
}

fn ca_certificate(ca: &TestCa) -> Certificate {
    proto::tls::read_ca(&ca.cert_file()).expect("the CA certificate")
}

/// How the gRPC links of a test stack are set up: plaintext, or TLS with the servers' certificates from
/// `server_ca` while the clients (usage → billing, gateway → billing and usage) trust `client_ca`.
enum Grpc<'a> {
    Plaintext,
    Tls {
        server_ca: &'a TestCa,
        client_ca: &'a TestCa,
    },
}

impl Grpc<'_> {
    fn scheme(&self) -> &'static str {
        match self {
            Self::Plaintext => "http",
            Self::Tls { .. } => "https",
        }
    }

    fn server_tls(&self) -> Option<ServerTlsConfig> {
        match self {
            Self::Plaintext => None,
            Self::Tls { server_ca, .. } => Some(grpc_tls(server_ca)),
        }
    }

    fn client_ca(&self) -> Option<Certificate> {
        match self {
            Self::Plaintext => None,
            Self::Tls { client_ca, .. } => Some(ca_certificate(client_ca)),
        }
    }
}

/// Billing, usage and a gateway in this process, connected as `grpc` says, usage on `redis_client`; the
/// test's own admin client reaches billing with the servers' CA.
struct Stack {
    _billing: integration_tests::BillingInstance,
    _upstream: integration_tests::Upstream,
    admin: integration_tests::AdminClient,
    backends: gateway::backends::Backends,
    gateway: SocketAddr,
    _stops: Vec<oneshot::Sender<()>>,
}

impl Stack {
    async fn start(grpc: Grpc<'_>, redis_client: redis::Client) -> Self {
        Self::start_on(fresh_database().await, grpc, redis_client).await
    }

    /// Starts the stack with billing on `db`.
    async fn start_on(db: sqlx::PgPool, grpc: Grpc<'_>, redis_client: redis::Client) -> Self {
        let billing = match grpc.server_tls() {
            None => {
                let clock = Arc::new(billing::ManualClock::new(OffsetDateTime::now_utc()));
                integration_tests::spawn_billing_with_clock(db, clock).await
            }
            Some(tls) => spawn_billing_with_tls(db, tls).await,
        };
        let admin_channel = match &grpc {
            Grpc::Plaintext => {
                tonic::transport::Channel::from_shared(format!("http://{}", billing.addr))
                    .expect("a valid URI")
                    .connect()
                    .await
                    .expect("billing is up")
            }
            Grpc::Tls { server_ca, .. } => {
                channel_trusting(billing.addr, "127.0.0.1", &ca_certificate(server_ca)).await
            }
        };
        let admin = BillingAdminClient::with_interceptor(
            admin_channel,
            BearerToken::new(Some(ADMIN_TOKEN)),
        );
        let scheme = grpc.scheme();
        let client_ca = grpc.client_ca();
        let mut stops = Vec::new();

        let connection = usage::connect_redis_with(&redis_client)
            .await
            .expect("redis answers");
        let counters = usage::Counters::new(connection.clone(), usage::Keys::new(unique_prefix()))
            .await
            .expect("the usage scripts load");
        let probe = usage::RedisProbe::with_client(redis_client, connection);
        let billing_client = usage::billing_client_trusting(
            &format!("{scheme}://127.0.0.1:{}", billing.addr.port()),
            SERVICE_TOKEN,
            client_ca.as_ref(),
        )
        .expect("a billing client");
        let usage_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind usage");
        let usage_addr = usage_listener.local_addr().expect("an address");
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(usage::serve(
            proto::tls::GrpcListener::new(usage_listener, grpc.server_tls()),
            counters,
            probe,
            billing_client,
            usage::Settings {
                service_token: SERVICE_TOKEN.into(),
                report_interval: Duration::from_millis(50),
                reconcile_interval: Duration::from_secs(1),
            },
            async move {
                let _ = stopped.await;
            },
        ));

        let upstream = spawn_ok_upstream().await;
        let (file, table) =
            gateway::routes::parse_routes_file(&routes(upstream.addr)).expect("valid routes");
        let channel = |addr: SocketAddr| {
            gateway::backends::channel_trusting(
                &format!("{scheme}://127.0.0.1:{}", addr.port()),
                client_ca.as_ref(),
            )
            .expect("a channel")
        };
        let backends = gateway::backends::Backends::new(
            channel(billing.addr),
            channel(usage_addr),
            proto::auth::BearerToken::new(SERVICE_TOKEN).expect("a token"),
            integration_tests::TEST_BACKEND_DEADLINE,
        );
        let gateway_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let gateway = gateway_listener.local_addr().expect("an address");
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(gateway::serve(
            gateway_listener,
            gateway::gateway(
                file,
                table,
                backends.clone(),
                Duration::from_secs(60),
                gateway::config::Leases::On,
            ),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            _billing: billing,
            _upstream: upstream,
            admin,
            backends,
            gateway,
            _stops: stops,
        }
    }

    /// Creates a customer on a free plan of 10 units and returns a key of theirs.
    async fn paying_key(&mut self) -> String {
        let plan = self
            .admin
            .create_plan(integration_tests::free_plan(10))
            .await
            .expect("plan")
            .into_inner();
        let customer = self
            .admin
            .create_customer(customer_request(&uuid::Uuid::new_v4().to_string()))
            .await
            .expect("customer")
            .into_inner();
        self.admin
            .create_subscription(CreateSubscriptionRequest {
                customer_id: customer.id.clone(),
                plan_id: plan.id,
            })
            .await
            .expect("subscription");
        self.admin
            .issue_api_key(IssueApiKeyRequest {
                customer_id: customer.id,
                name: "tls".into(),
            })
            .await
            .expect("key")
            .into_inner()
            .secret
    }

    async fn call(&self, key: &str) -> integration_tests::Answer {
        let url = format!("http://{}/v1/things", self.gateway);
        let authorization = format!("Bearer {key}");
        send(
            &http_client(),
            get(&url, &[("authorization", authorization.as_str())]),
        )
        .await
    }
}

fn plain_redis_client(url: &str) -> redis::Client {
    usage::redis_client(url, None).expect("a redis client")
}

fn one_line(message: String) -> String {
    assert!(!message.contains('\n'), "not one line: {message}");
    message
}

#[tokio::test]
async fn billing_serves_admin_calls_over_a_postgres_that_requires_verified_tls() {
    let ca = TestCa::new("postgres-ca");
    let postgres = spawn_tls_postgres(&ca).await;
    let options: PgConnectOptions = postgres
        .database_url_trusting(&ca.cert_file())
        .parse()
        .expect("a valid URL");

    let db = billing::connect_database(options, 4)
        .await
        .expect("billing connects with sslmode=verify-full");
    let billing = spawn_billing(db).await;
    let created = billing
        .admin()
        .await
        .create_customer(customer_request("over-tls"))
        .await;

    assert_eq!(
        created.expect("created").into_inner().external_id,
        "over-tls"
    );
}

#[tokio::test]
async fn a_postgres_that_requires_tls_refuses_plaintext_and_accepts_sslmode_require() {
    let ca = TestCa::new("postgres-ca");
    let postgres = spawn_tls_postgres(&ca).await;

    let plaintext = PgConnection::connect(&postgres.database_url_with_sslmode("disable")).await;
    let required = PgConnection::connect(&postgres.database_url_with_sslmode("require")).await;

    let refusal = plaintext.expect_err("plaintext is refused").to_string();
    assert!(refusal.contains("no encryption"), "{refusal}");
    required.expect("sslmode=require connects without verifying");
}

#[tokio::test]
async fn billing_refuses_to_start_when_postgres_presents_a_certificate_from_another_ca() {
    let ca = TestCa::new("postgres-ca");
    let postgres = spawn_tls_postgres(&ca).await;
    let other = TestCa::new("other-ca");
    let options: PgConnectOptions = postgres
        .database_url_trusting(&other.cert_file())
        .parse()
        .expect("a valid URL");

    let error = billing::connect_database(options, 4)
        .await
        .expect_err("an untrusted certificate is refused");

    let message = one_line(format!("{error:#}"));
    assert!(message.contains("certificate was not trusted"), "{message}");
    assert!(message.contains("DATABASE_URL"), "{message}");
}

#[tokio::test]
async fn usage_admits_a_paid_request_over_rediss_verified_with_redis_ca_file() {
    let ca = TestCa::new("redis-ca");
    let redis = spawn_tls_redis(&ca).await;
    let client = usage::redis_client(&redis.url(), Some(&ca.cert_file())).expect("a TLS client");
    let mut stack = Stack::start(Grpc::Plaintext, client).await;
    let key = stack.paying_key().await;

    let answer = stack.call(&key).await;

    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(&answer.body[..], b"ok");
}

#[tokio::test]
async fn usage_refuses_to_start_when_redis_presents_a_certificate_from_another_ca() {
    let ca = TestCa::new("redis-ca");
    let redis = spawn_tls_redis(&ca).await;
    let other = TestCa::new("other-ca");
    let client = usage::redis_client(&redis.url(), Some(&other.cert_file())).expect("a client");

    let error = usage::connect_redis_with(&client)
        .await
        .expect_err("an untrusted certificate is refused");

    let message = one_line(format!("{error:#}"));
    assert!(message.contains("certificate was not trusted"), "{message}");
    assert!(message.contains("REDIS_CA_FILE"), "{message}");
}

#[tokio::test]
async fn a_redis_ca_file_with_a_plaintext_redis_url_is_refused() {
    let ca = TestCa::new("redis-ca");

    let error =
        usage::redis_client("redis://127.0.0.1:6379", Some(&ca.cert_file())).expect_err("refused");

    let message = one_line(format!("{error:#}"));
    assert!(message.contains("REDIS_CA_FILE"), "{message}");
    assert!(message.contains("rediss://"), "{message}");
}

#[tokio::test]
async fn the_gateway_serves_a_paid_request_through_billing_and_usage_over_grpc_tls() {
    let ca = TestCa::new("grpc-ca");
    let grpc = Grpc::Tls {
        server_ca: &ca,
        client_ca: &ca,
    };
    let mut stack = Stack::start(grpc, plain_redis_client(&redis_url().await)).await;
    let key = stack.paying_key().await;

    let answer = stack.call(&key).await;

    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(&answer.body[..], b"ok");
    assert_eq!(stack.backends.billing_failing_because(), None);
    assert_eq!(stack.backends.usage_failing_because(), None);
}

#[tokio::test]
async fn the_breaker_probe_closes_over_tls_once_billing_serves_again() {
    let ca = TestCa::new("grpc-ca");
    let mut postgres = spawn_restartable_postgres().await;
    let db = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(billing::DB_ACQUIRE_TIMEOUT)
        .connect(postgres.database_url())
        .await
        .expect("the database");
    let grpc = Grpc::Tls {
        server_ca: &ca,
        client_ca: &ca,
    };
    let mut stack = Stack::start_on(db, grpc, plain_redis_client(&redis_url().await)).await;
    let key = stack.paying_key().await;
    postgres.stop().await;
    let started = std::time::Instant::now();
    while stack.backends.billing_failing_because().is_none() {
        assert!(
            started.elapsed() < PATIENCE,
            "the billing breaker did not open"
        );
        let answer = stack.call(&key).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    postgres.start().await;
    let started = std::time::Instant::now();
    while stack.backends.billing_failing_because().is_some() {
        assert!(
            started.elapsed() < PATIENCE,
            "the probe did not close the breaker over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = stack.call(&key).await;

    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
}

#[tokio::test]
async fn billing_answers_grpc_health_over_tls() {
    let ca = TestCa::new("grpc-ca");
    let billing = spawn_billing_with_tls(fresh_database().await, grpc_tls(&ca)).await;
    let mut health =
        HealthClient::new(channel_trusting(billing.addr, "localhost", &ca_certificate(&ca)).await);

    let answer = health
        .check(HealthCheckRequest {
            service: "billing.v1.Entitlements".into(),
        })
        .await
        .expect("health answers");

    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
}

#[tokio::test]
async fn a_gateway_that_does_not_trust_the_backends_certificate_answers_503_and_says_why() {
    let server_ca = TestCa::new("grpc-ca");
    let other = TestCa::new("other-ca");
    let grpc = Grpc::Tls {
        server_ca: &server_ca,
        client_ca: &other,
    };
    // Usage's own link to billing is not under test here; it distrusts billing just like the gateway.
    let mut stack = Stack::start(grpc, plain_redis_client(&redis_url().await)).await;
    let key = stack.paying_key().await;

    let first = stack.call(&key).await;
    let started = std::time::Instant::now();
    let cause = loop {
        if let Some(cause) = stack.backends.billing_failing_because() {
            break cause;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the billing breaker did not open"
        );
        let answer = stack.call(&key).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    };

    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.json()["code"], "billing_unavailable");
    assert!(cause.contains("certificate was not trusted"), "{cause}");
    assert!(cause.contains("PAYGATE_GRPC_CA_FILE"), "{cause}");
}

async fn paygatectl(args: &[&str]) -> Result<String, paygatectl::CtlError> {
    let mut argv = vec!["paygatectl", "--token", ADMIN_TOKEN];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    paygatectl::run(
        paygatectl::Cli::try_parse_from(argv).expect("valid arguments"),
        &mut out,
    )
    .await?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

#[tokio::test]
async fn paygatectl_administers_a_tls_billing_with_ca_file_and_names_it_when_the_ca_is_wrong() {
    let ca = TestCa::new("grpc-ca");
    let other = TestCa::new("other-ca");
    let billing = spawn_billing_with_tls(fresh_database().await, grpc_tls(&ca)).await;
    let url = format!("https://127.0.0.1:{}", billing.addr.port());
    let trusted = ca.cert_file();
    let untrusted = other.cert_file();

    let created = paygatectl(&[
        "--url",
        &url,
        "--ca-file",
        trusted.to_str().expect("UTF-8"),
        "customers",
        "create",
        "--external-id",
        "tls-customer",
        "-q",
    ])
    .await;
    let refused = paygatectl(&[
        "--url",
        &url,
        "--ca-file",
        untrusted.to_str().expect("UTF-8"),
        "customers",
        "list",
    ])
    .await;

    assert!(!created.expect("created over TLS").trim().is_empty());
    let message = refused.expect_err("refused").to_string();
    assert!(
        message.contains("certificate that was not trusted"),
        "{message}"
    );
    assert!(message.contains("--ca-file"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}
