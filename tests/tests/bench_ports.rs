//! The benchmarks' process starts (`integration_tests::bench`) against a port another process took: a first
//! start moves to another port, and a restart that must keep its port fails at once with one line naming
//! the port and the process holding it.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use http::StatusCode;
use integration_tests::{
    bench::{ServiceSpec, StartError, free_port, gateway_spec, restart_within},
    get, http_client,
};
use tokio::sync::OnceCell;

/// Builds the service binaries into this build's target directory once per test process, as `bench/run`
/// and `bench/faults` do (so they share one set of artifacts); returns the directory holding them.
async fn binaries() -> &'static Path {
    static DIR: OnceCell<PathBuf> = OnceCell::const_new();
    DIR.get_or_init(|| async {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = tokio::process::Command::new(&cargo)
            .current_dir(&root)
            .args(["build", "--locked", "-p", "billing", "-p", "usage"])
            .args(["-p", "gateway", "-p", "integration-tests"])
            .args(["--bin", "billing", "--bin", "usage", "--bin", "gateway"])
            .arg("--target-dir")
            .arg(&target)
            .status()
            .await
            .expect("cargo runs");
        assert!(built.success(), "building the service binaries failed");
        target.join("debug")
    })
    .await
}

/// A gateway as the benchmarks start it, with billing, usage and the upstream on ports nothing listens on
/// (it starts and serves its health check without them); and the directory holding its routes file.
async fn gateway() -> (ServiceSpec, PathBuf) {
    let work = integration_tests::bench::work_dir("bench-ports");
    let nowhere = free_port();
    let spec = gateway_spec(
        binaries().await,
        &work,
        &format!("127.0.0.1:{nowhere}"),
        250,
        nowhere,
        nowhere,
    );
    (spec, work)
}

async fn health_status(port: u16) -> StatusCode {
    let url = format!("http://127.0.0.1:{port}/_paygate/health");
    http_client()
        .request(get(&url, &[]))
        .await
        .expect("the gateway answers")
        .status()
}

#[tokio::test]
async fn a_service_whose_picked_port_was_taken_starts_on_another_port() {
    let (spec, work) = gateway().await;
    let squatter = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let taken = squatter.local_addr().expect("its address").port();
    let mut picks = 0;
    let pick_port = || {
        picks += 1;
        if picks == 1 { taken } else { free_port() }
    };

    let running = spec.start_picking(pick_port).await;

    assert_ne!(running.port, taken);
    assert!(
        picks > 2,
        "only {picks} ports were picked: no second attempt"
    );
    assert_eq!(health_status(running.port).await, StatusCode::OK);
    let _ = std::fs::remove_dir_all(work);
}

#[tokio::test]
async fn a_restart_on_a_port_another_process_took_fails_soon_naming_the_port() {
    let (spec, work) = gateway().await;
    let mut running = spec.start().await;
    running.process.kill_hard();
    let _squatter = TcpListener::bind(("127.0.0.1", running.port)).expect("the freed port");

    let started = Instant::now();
    let restarted = restart_within(Duration::from_secs(60), || spec.start_on(running.port)).await;

    let Err(error @ StartError::PortTaken { port, .. }) = restarted else {
        panic!("the restart did not fail because of the taken port");
    };
    assert_eq!(port, running.port);
    assert!(started.elapsed() < Duration::from_secs(30));
    let line = error.to_string();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains(&format!("port {}", running.port)), "{line}");
    assert!(
        line.contains(&format!("process {}", std::process::id())),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(work);
}
