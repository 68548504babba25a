//! `paygatectl health`: healthchecks a container runs with nothing else in the image (no shell tools, no
//! grpcurl, no curl). Each exits 0 only when the service says it is serving.

use std::time::Duration;

use bytes::Bytes;
use clap::Subcommand;
use http_body_util::Empty;
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::CtlError;

/// How long a check may take in all, well inside the usual healthcheck timeout of a few seconds.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The healthchecks.
#[derive(Debug, Subcommand)]
pub enum HealthCommand {
    /// Ask a gRPC server (billing, usage) for its health; exit 0 only when it answers SERVING.
    ///
    /// `https://` targets are verified against PAYGATE_GRPC_CA_FILE when set, else the system roots.
    Grpc {
        /// `host:port` (plain gRPC), or an `http://` or `https://` URL.
        target: String,
        /// The service to ask about; empty means the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// GET an HTTP URL (the gateway's /_paygate/ready); exit 0 only on a 2xx answer.
    Http {
        /// An `http://` URL.
        url: String,
    },
}

/// Runs one healthcheck: `Ok` when healthy, else why not in one line.
pub async fn check(command: &HealthCommand) -> Result<(), CtlError> {
    let target = match command {
        HealthCommand::Grpc { target, .. } => target,
        HealthCommand::Http { url } => url,
    };
    let checked = match command {
        HealthCommand::Grpc { target, service } => {
            tokio::time::timeout(CHECK_TIMEOUT, check_grpc(target, service)).await
        }
        HealthCommand::Http { url } => tokio::time::timeout(CHECK_TIMEOUT, check_http(url)).await,
    };
    checked.unwrap_or_else(|_| {
        Err(CtlError::Unhealthy(format!(
            "{target} did not answer within {} s",
            CHECK_TIMEOUT.as_secs()
        )))
    })
}

async fn check_grpc(target: &str, service: &str) -> Result<(), CtlError> {
    let url = if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    let mut endpoint =
        Endpoint::from_shared(url.clone()).map_err(|_| CtlError::BadUrl(target.to_owned()))?;
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(grpc_tls()?)
            .map_err(|error| CtlError::Unhealthy(format!("{target}: {error}")))?;
    }
    let channel = endpoint.connect().await.map_err(|error| {
        CtlError::Unhealthy(format!(
            "{target} is unreachable: {}",
            crate::source_chain(&error)
        ))
    })?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| {
            CtlError::Unhealthy(format!(
                "{target} answered {:?}: {}",
                status.code(),
                status.message()
            ))
        })?
        .into_inner();
    match ServingStatus::try_from(answer.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(CtlError::Unhealthy(format!(
            "{target} is {}",
            status.as_str_name()
        ))),
        Err(_) => Err(CtlError::Unhealthy(format!(
            "{target} answered an unknown status {}",
            answer.status
        ))),
    }
}

/// The same trust a service has for gRPC: only the CA in PAYGATE_GRPC_CA_FILE when set, else the system
/// roots.
fn grpc_tls() -> Result<ClientTlsConfig, CtlError> {
    match std::env::var_os("PAYGATE_GRPC_CA_FILE").filter(|path| !path.is_empty()) {
        Some(path) => {
            let ca = proto::tls::read_ca(std::path::Path::new(&path))
                .map_err(|error| CtlError::Unhealthy(format!("PAYGATE_GRPC_CA_FILE: {error}")))?;
            Ok(ClientTlsConfig::new().ca_certificate(ca))
        }
        None => Ok(ClientTlsConfig::new().with_native_roots()),
    }
}

async fn check_http(url: &str) -> Result<(), CtlError> {
    let uri: Uri = url.parse().map_err(|_| CtlError::BadUrl(url.to_owned()))?;
    if uri.scheme_str() != Some("http") {
        return Err(CtlError::Unhealthy(format!(
            "`{url}`: only http:// URLs can be checked"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| CtlError::BadUrl(url.to_owned()))?
        .clone();
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let unreachable = |error: &(dyn std::error::Error + 'static)| {
        CtlError::Unhealthy(format!(
            "{url} is unreachable: {}",
            crate::source_chain(error)
        ))
    };
    let stream = TcpStream::connect(&address)
        .await
        .map_err(|error| unreachable(&error))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| unreachable(&error))?;
    tokio::spawn(connection);
    let request = Request::get(uri.path_and_query().map_or("/", |path| path.as_str()))
        .header(header::HOST, authority.as_str())
        .header(header::USER_AGENT, "paygatectl-health")
        .body(Empty::<Bytes>::new())
        .map_err(|_| CtlError::BadUrl(url.to_owned()))?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|error| unreachable(&error))?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(CtlError::Unhealthy(format!(
            "{url} answered {}",
            answer.status()
        )))
    }
}
