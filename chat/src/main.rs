//! `sbchat`: the Switchboard command-line client, scriptable (`--json`) and
//! interactive (`chat`), built on the `switchboard-client` SDK.
//!
//! `main` only parses flags, sets up tracing and a runtime, runs the
//! subcommand and maps the outcome to an exit code: 0 ok, 1 error, 2 usage
//! (clap exits with 2 by itself for malformed command lines), 3 a message
//! still queued in the outbox.

mod cli;
mod cmd;
mod contacts;
mod home;
mod inbox;
mod output;
mod prompt;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::output::Output;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr so stdout stays clean for text and JSON lines. The
    // SDK's warnings (reconnects, ...) are already shown as sbchat's own
    // notes, so only errors are logged unless SBCHAT_LOG says otherwise.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SBCHAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let out = Output::new(cli.json);
    // One thread is plenty for one connection and a terminal.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out.error(&anyhow::Error::new(e).context("cannot start the async runtime"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cmd::run(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            if e.is::<cli::UsageError>() {
                ExitCode::from(2)
            } else if e.is::<cli::QueuedError>() {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
