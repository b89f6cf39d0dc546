//! Command line of `apm-listener`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::server::{Faults, Limits, ListenerConfig, TlsFiles};
use crate::store::{DEFAULT_MAX_RANGES, DEFAULT_MAX_SERIES};

const LIMITS: &str = "Limits (against misbehaving agents)";

/// Reference central listener: stores each profile once, acks after the write.
#[derive(Debug, Parser)]
#[command(name = "apm-listener", version)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed on the ready line).
    #[arg(long, default_value = "127.0.0.1:7421")]
    pub listen: SocketAddr,
    /// Output file: one JSON line per stored profile; appended, never truncated except for a
    /// torn tail at start.
    #[arg(long)]
    pub out: PathBuf,
    /// Require `authorization: Bearer TOKEN` on every stream (one token for every agent id;
    /// see --tokens-file to bind tokens to agent ids).
    #[arg(
        long,
        env = "APM_LISTENER_TOKEN",
        hide_env_values = true,
        conflicts_with = "tokens_file"
    )]
    pub token: Option<String>,
    /// File of `AGENT_ID TOKEN` lines (`#` comments, blank lines ignored): a stream must carry
    /// one of these tokens, and may only send batches for that token's agent id.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// fdatasync the output file before acking (survives power loss); default: ack once
    /// write(2) returned (survives a listener crash, not a host crash).
    #[arg(long)]
    pub fsync: bool,
    /// Seconds between stats log lines; 0 turns them off.
    #[arg(long, default_value_t = 10)]
    pub stats_interval: u64,
    /// Open connections at most; one more is closed at once (the agent backs off and retries).
    #[arg(long, value_name = "N", default_value_t = 1024, help_heading = LIMITS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Streams open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); an
    /// agent uses one.
    #[arg(long, value_name = "N", default_value_t = 16, help_heading = LIMITS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Largest batch accepted, decompressed; a larger one ends its stream with OUT_OF_RANGE.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, help_heading = LIMITS,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_message_bytes: u32,
    /// Agents (agent id + epoch) whose stored seqs are tracked; a batch of one more is answered
    /// RETRY until the listener restarts with a higher bound.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SERIES as u32, help_heading = LIMITS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_agents: u32,
    /// Disjoint ranges of stored seqs per agent; a seq that would open one more (a new gap) is
    /// answered RETRY until a gap fills.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_RANGES as u32, help_heading = LIMITS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_seq_ranges: u32,
    // Fault injection for the tests: accepted, never shown in --help.
    /// After storing the N-th batch (1-based, across connections), drop its stream with an
    /// error without acking it; once.
    #[arg(long, value_name = "N", hide = true)]
    pub drop_before_ack: Option<u64>,
    /// Delay every ack by MS milliseconds after its write.
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pub ack_delay: u64,
    /// Answer the first N batches RETRY without storing them.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub fail_first: u64,
    /// Answer the N batches after the --fail-first ones REJECTED without storing them.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub reject_first: u64,
}

impl Args {
    pub fn into_config(self) -> ListenerConfig {
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        ListenerConfig {
            listen: self.listen,
            out: self.out,
            token: self.token.filter(|t| !t.is_empty()),
            tokens_file: self.tokens_file,
            tls,
            fsync: self.fsync,
            limits: Limits {
                max_connections: self.max_connections as usize,
                max_concurrent_streams: self.max_concurrent_streams,
                max_message_bytes: self.max_message_bytes as usize,
                max_series: self.max_agents as usize,
                max_ranges: self.max_seq_ranges as usize,
            },
            faults: Faults {
                drop_before_ack: self.drop_before_ack.filter(|&n| n > 0),
                ack_delay: Duration::from_millis(self.ack_delay),
                fail_first: self.fail_first,
                reject_first: self.reject_first,
            },
            stats_interval: Duration::from_secs(self.stats_interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("apm-listener").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let cfg = parse(&["--out", "x.jsonl"]).expect("parses").into_config();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:7421");
        assert_eq!(cfg.out, PathBuf::from("x.jsonl"));
        assert!(cfg.token.is_none() && cfg.tls.is_none() && !cfg.fsync);
        assert_eq!(cfg.faults.drop_before_ack, None);
        assert_eq!(cfg.faults.fail_first, 0);
        assert!(cfg.faults.ack_delay.is_zero());
        assert_eq!(cfg.limits, Limits::default());
    }

    #[test]
    fn all_flags() {
        let cfg = parse(&[
            "--listen",
            "0.0.0.0:0",
            "--out",
            "o",
            "--token",
            "s3",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--fsync",
            "--drop-before-ack",
            "3",
            "--ack-delay",
            "250",
            "--fail-first",
            "2",
        ])
        .expect("parses")
        .into_config();
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(cfg.token.as_deref(), Some("s3"));
        let tls = cfg.tls.expect("tls");
        assert_eq!(
            (tls.cert, tls.key),
            (PathBuf::from("c.pem"), PathBuf::from("k.pem"))
        );
        assert!(cfg.fsync);
        assert_eq!(cfg.faults.drop_before_ack, Some(3));
        assert_eq!(cfg.faults.ack_delay, Duration::from_millis(250));
        assert_eq!(cfg.faults.fail_first, 2);
    }

    #[test]
    fn errors_name_the_flag() {
        let e = parse(&[]).expect_err("--out is required").to_string();
        assert!(e.contains("--out"), "{e}");
        let e = parse(&["--out", "o", "--tls-cert", "c.pem"])
            .expect_err("needs key")
            .to_string();
        assert!(e.contains("--tls-key"), "{e}");
        let e = parse(&["--out", "o", "--listen", "nowhere"])
            .expect_err("bad addr")
            .to_string();
        assert!(e.contains("--listen"), "{e}");
        let e = parse(&["--out", "o", "--token", "t", "--tokens-file", "f"])
            .expect_err("one or the other")
            .to_string();
        assert!(e.contains("--tokens-file"), "{e}");
        let e = parse(&["--out", "o", "--max-connections", "0"])
            .expect_err("at least 1")
            .to_string();
        assert!(e.contains("--max-connections"), "{e}");
    }
}
