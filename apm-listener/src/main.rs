//! `apm-listener --listen ADDR --out FILE` (or `--store jetstream:...`), and
//! `apm-listener export`: see `docs/listener.md` and `docs/scaling.md`.

use std::io::Write;

use anyhow::Context;
use apm_listener::cli::{Command, ExportArgs};
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

    if let Some(Command::Export(export)) = args.command {
        return run_export(export, sigterm, sigint).await;
    }
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

/// `apm-listener export`: runs until SIGTERM/SIGINT. Its totals go to stdout as one JSON line
/// after every round that read messages, and once more at exit.
async fn run_export(
    args: ExportArgs,
    mut sigterm: tokio::signal::unix::Signal,
    mut sigint: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let cfg = args.into_config().map_err(anyhow::Error::msg)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let progress = |s: &apm_listener::export::ExportSummary| {
        if let Ok(line) = serde_json::to_string(s) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        }
    };
    let mut task = tokio::spawn(apm_listener::export::run(cfg, stop.clone(), progress));
    let summary = tokio::select! {
        r = &mut task => r,
        _ = sigterm.recv() => { info!(signal = "SIGTERM", "stopping"); stop.cancel(); task.await }
        _ = sigint.recv() => { info!(signal = "SIGINT", "stopping"); stop.cancel(); task.await }
    }
    .context("export task")??;
    info!(summary = ?summary, "export stopped");
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
