//! paygatectl's entry point: parse, run, and report errors as one line (never a stack trace).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = paygatectl::Cli::parse();
    let mut out = std::io::stdout().lock();
    match paygatectl::run(cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("paygatectl: {error}");
            ExitCode::FAILURE
        }
    }
}
