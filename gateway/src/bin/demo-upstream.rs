//! A small API to put behind the gateway in demos and the local stack: `GET /v1/hello` answers JSON that
//! echoes who the gateway said is calling, and `GET /v1/stream` sends three server-sent events.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::var("DEMO_UPSTREAM_ADDR")
        .unwrap_or_else(|_| "0.0.0.0:9000".to_owned())
        .parse()?;
    let listener = TcpListener::bind(addr).await?;
    eprintln!("demo-upstream listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request| async move {
                Ok::<_, Infallible>(answer(request))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(request: Request<Incoming>) -> Response<Body> {
    let header_text = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if request.uri().path().ends_with("/stream") {
        let (frames, stream) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            for index in 1..=3 {
                let event = format!("data: {{\"event\": {index}}}\n\n");
                if frames.send(Ok(Frame::data(event.into()))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut response = Response::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(stream)).boxed(),
        );
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        return response;
    }
    let body = serde_json::json!({
        "message": "hello from the demo upstream",
        "path": request.uri().path(),
        "customer": header_text("paygate-customer"),
        "plan": header_text("paygate-plan"),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
