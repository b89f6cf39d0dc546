//! Command line of `apm-listener`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use clap::{Args as ClapArgs, Subcommand};

use crate::export::{DEFAULT_DURABLE, ExportConfig};
use crate::jetstream::{DEFAULT_STREAM, DEFAULT_SUBJECT, JetStreamConfig, parse_servers};
use crate::server::{Faults, Limits, ListenerConfig, TlsFiles};
use crate::store::{DEFAULT_MAX_RANGES, DEFAULT_MAX_SERIES};

const LIMITS: &str = "Limits (against misbehaving agents)";
const JETSTREAM: &str = "JetStream store (--store jetstream:...)";

/// Where batches are stored: `file:PATH` (the embedded default, same as `--out PATH`) or
/// `jetstream:nats://HOST:PORT,...` (a NATS JetStream stream shared by listener replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    File(PathBuf),
    JetStream(Vec<String>),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path, e.g. file:/var/lib/apm/profiles.jsonl".into());
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(list) = s.strip_prefix("jetstream:") {
            return parse_servers(list).map(Self::JetStream);
        }
        Err(format!(
            "`{s}`: expected file:PATH or jetstream:nats://HOST:PORT[,nats://HOST:PORT...]"
        ))
    }
}

/// The stream's settings, shared by the listener and `export`.
#[derive(Debug, Clone, ClapArgs)]
pub struct JetStreamArgs {
    /// Stream name (created if missing).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_STREAM, help_heading = JETSTREAM)]
    pub js_stream: String,
    /// Subject the batches are published on (the stream's only subject when it is created).
    #[arg(long, value_name = "SUBJECT", default_value = DEFAULT_SUBJECT, help_heading = JETSTREAM)]
    pub js_subject: String,
    /// Copies of each message in the cluster when the stream is created (R3 keeps quorum with
    /// one node down).
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = JETSTREAM,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub js_replicas: u8,
    /// JetStream deduplicates a batch resent within this window of its first publish; a later
    /// resend is stored in the stream again (`export` still writes it once). Set when the
    /// stream is created.
    #[arg(long, value_name = "DURATION", default_value = "10m", help_heading = JETSTREAM,
          value_parser = humantime::parse_duration)]
    pub js_duplicate_window: Duration,
    /// Messages older than this are deleted from the stream (exporters must read them first).
    #[arg(long, value_name = "DURATION", default_value = "7d", help_heading = JETSTREAM,
          value_parser = humantime::parse_duration)]
    pub js_max_age: Duration,
    /// A publish not acked by JetStream within this long is answered RETRY to the agent.
    #[arg(long, value_name = "DURATION", default_value = "5s", help_heading = JETSTREAM,
          value_parser = humantime::parse_duration)]
    pub js_publish_timeout: Duration,
    /// How long the start waits for NATS and the stream (a cluster electing its leader).
    #[arg(long, value_name = "DURATION", default_value = "30s", help_heading = JETSTREAM,
          value_parser = humantime::parse_duration)]
    pub js_start_timeout: Duration,
}

impl JetStreamArgs {
    pub fn config(&self, servers: Vec<String>) -> JetStreamConfig {
        JetStreamConfig {
            servers,
            stream: self.js_stream.clone(),
            subject: self.js_subject.clone(),
            replicas: usize::from(self.js_replicas),
            duplicate_window: self.js_duplicate_window,
            max_age: self.js_max_age,
            publish_timeout: self.js_publish_timeout,
            start_timeout: self.js_start_timeout,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read the JetStream stream with a durable consumer and append its batches to a JSONL file
    /// (the file store's format); acks after each write, resumes where it stopped.
    Export(ExportArgs),
}

#[derive(Debug, ClapArgs)]
pub struct ExportArgs {
    /// `jetstream:nats://HOST:PORT,...`: the servers of the stream to read.
    #[arg(long, value_name = "STORE")]
    pub store: StoreSpec,
    /// Output file (appended; its torn tail is cut and its batches deduplicated at start).
    #[arg(long)]
    pub out: PathBuf,
    /// Durable consumer name: one per output; a restart resumes after its last ack.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_DURABLE)]
    pub durable: String,
    /// fdatasync each write before acking it to JetStream.
    #[arg(long)]
    pub fsync: bool,
    /// A message delivered to this exporter and not acked within this long is delivered again
    /// (a fetch lost with its connection to a NATS node comes back after it).
    #[arg(long, value_name = "DURATION", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,
    /// Messages fetched, written and acked per round at most.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    #[command(flatten)]
    pub js: JetStreamArgs,
}

impl ExportArgs {
    pub fn into_config(self) -> Result<ExportConfig, String> {
        let StoreSpec::JetStream(servers) = self.store else {
            return Err(
                "export reads a JetStream store: --store jetstream:nats://HOST:PORT".into(),
            );
        };
        Ok(ExportConfig {
            js: self.js.config(servers),
            durable: self.durable,
            out: self.out,
            fsync: self.fsync,
            ack_wait: self.ack_wait,
            batch: self.batch as usize,
        })
    }
}

/// Reference central listener: stores each profile once, acks after the write.
#[derive(Debug, Parser)]
#[command(
    name = "apm-listener",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address to listen on; port 0 picks a free port (printed on the ready line).
    #[arg(long, default_value = "127.0.0.1:7421")]
    pub listen: SocketAddr,
    /// Output file: one JSON line per stored profile; appended, never truncated except for a
    /// torn tail at start. Same as `--store file:FILE`.
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    pub out: Option<PathBuf>,
    /// Where to store: `file:PATH` (as --out) or `jetstream:nats://HOST:PORT,...` (stateless
    /// replicas sharing one JetStream stream; see docs/scaling.md).
    #[arg(long, value_name = "STORE")]
    pub store: Option<StoreSpec>,
    #[command(flatten)]
    pub js: JetStreamArgs,
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
        let (out, jetstream) = match (self.store, self.out) {
            (Some(StoreSpec::JetStream(servers)), _) => {
                (PathBuf::new(), Some(self.js.config(servers)))
            }
            (Some(StoreSpec::File(path)), _) => (path, None),
            (None, out) => (out.unwrap_or_default(), None),
        };
        ListenerConfig {
            listen: self.listen,
            out,
            jetstream,
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

    /// `--store jetstream:` with no other flag gives `JetStreamConfig::new`'s defaults (the
    /// documented ones), and `--store file:` is `--out`.
    #[test]
    fn store_flag_selects_the_store_with_documented_defaults() {
        let cfg = parse(&[
            "--store",
            "jetstream:nats://127.0.0.1:4222,nats://127.0.0.1:4223",
        ])
        .expect("parses")
        .into_config();
        let servers = vec![
            "nats://127.0.0.1:4222".to_string(),
            "nats://127.0.0.1:4223".to_string(),
        ];
        assert_eq!(cfg.jetstream, Some(JetStreamConfig::new(servers)));
        let cfg = parse(&["--store", "file:/tmp/x.jsonl"])
            .expect("parses")
            .into_config();
        assert_eq!(
            (cfg.out, cfg.jetstream),
            (PathBuf::from("/tmp/x.jsonl"), None)
        );
        let e = parse(&["--store", "s3:bucket"])
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("--store") && e.contains("jetstream:"), "{e}");
        let e = parse(&["--out", "o", "--store", "file:p"])
            .expect_err("one or the other")
            .to_string();
        assert!(e.contains("--store"), "{e}");
        let e = parse(&["export", "--store", "file:p", "--out", "o"])
            .expect("parses")
            .command
            .map(|Command::Export(x)| x.into_config().expect_err("needs jetstream"));
        assert!(e.is_some_and(|e| e.contains("jetstream:")));
        let Some(Command::Export(x)) =
            parse(&["export", "--store", "jetstream:nats://h:1", "--out", "o"])
                .expect("parses")
                .command
        else {
            panic!("export subcommand");
        };
        let x = x.into_config().expect("config");
        assert_eq!(
            (x.durable.as_str(), x.batch, x.fsync),
            ("apm-export", 256, false)
        );
        assert_eq!(x.js.stream, "APM_PROFILES");
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
