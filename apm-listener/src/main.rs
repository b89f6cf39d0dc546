//! `apm-listener --listen ADDR --out FILE`: see `docs/listener.md`.

use std::io::Write;

use anyhow::Context;
use apm_listener::{Args, Listener};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut listener = Listener::start(args.into_config()).await?;
    // The ready line scripts and tests wait for (with the real port when --listen used port 0).
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "apm-listener listening on {}",
        listener.local_addr()
    )
    .and_then(|()| stdout.flush())
    .context("printing the ready line")?;
    drop(stdout);

    tokio::select! {
        _ = sigterm.recv() => info!(signal = "SIGTERM", "stopping"),
        _ = sigint.recv() => info!(signal = "SIGINT", "stopping"),
        e = listener.failed() => return Err(e.into()),
    }
    listener.shutdown().await?;
    Ok(())
}
