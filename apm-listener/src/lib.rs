//! `apm-listener`, the reference central listener: a gRPC `Collector` server that stores every
//! profile of every batch once, as one JSON line in an append-only file, and acks a batch only
//! after its lines are written (flushed to the kernel, or fdatasync'd with `--fsync`).
//!
//! Pipeline: one task per stream (decode, encode the lines, keep acks in order) → one writer
//! thread (dedup by `(agent_id, seq)`, group commit: one `writev` and at most one fdatasync per
//! group) → answers back to each stream. See `docs/listener.md`.

pub mod auth;
pub mod cli;
pub mod export;
pub mod format;
pub mod intervals;
pub mod jetstream;
pub mod server;
pub mod service;
pub mod stats;
pub mod store;

pub use cli::Args;
pub use server::{Faults, Limits, Listener, ListenerConfig, ServerError, TlsFiles};
pub use stats::StatsSnapshot;
