//! `apm-dist-gen OUTDIR`: the man pages (`OUTDIR/man/*.1.gz`, one per command and subcommand)
//! and the bash, zsh and fish completions of `apm-agent` and `apm-listener`, rendered from the
//! same clap definitions the binaries parse with, so the package's documentation cannot drift
//! from `--help`. `cargo xtask dist` runs it; it lives apart from xtask so that xtask itself
//! does not compile the agent.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .context("usage: apm-dist-gen OUTDIR")?,
    );
    for cmd in [
        apm_agent::cli::Cli::command(),
        apm_listener::Args::command(),
    ] {
        man_pages(cmd.clone(), &out.join("man"))?;
        completions(cmd, &out)?;
    }
    Ok(())
}

/// `name.1.gz` for the command and `name-sub.1.gz` for each subcommand, gzipped without a
/// timestamp (Debian wants man pages compressed, and the package reproducible).
fn man_pages(cmd: clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![(cmd.get_name().to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        // clap wants a 'static name without its `string` feature; this process is short-lived.
        let name: &'static str =
            Box::leak(format!("{}-{}", cmd.get_name(), sub.get_name()).into_boxed_str());
        pages.push((name.to_string(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(page).render(&mut roff)?;
        let path = dir.join(format!("{name}.1.gz"));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut gz = flate2::GzBuilder::new().write(file, flate2::Compression::best());
        gz.write_all(&roff)?;
        gz.finish()?;
    }
    Ok(())
}

/// Completions under the names each shell's Debian directory expects.
fn completions(mut cmd: clap::Command, out: &Path) -> Result<()> {
    let name = cmd.get_name().to_string();
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir)?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut text);
        std::fs::write(dir.join(&file), text)
            .with_context(|| format!("cannot write {}", dir.join(&file).display()))?;
    }
    Ok(())
}
