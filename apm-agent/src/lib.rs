//! The Bitville APM agent: a pipeline of stages, each owning its task and talking to the next
//! through bounded channels, with side parts beside it. `docs/architecture.md` walks one profile
//! through the functions named here.
//!
//! ```text
//! pipeline/  ingest (dgram + stream sockets) -> batch -> router (breaker, spool) -> transport (gRPC)
//! beside it: monitor (eBPF)  control (status, metrics)  telemetry  state (agent id, seq)  phpctl
//! daemon/    acquires what the pipeline needs, spawns it, serves signals, shuts down in order
//! ```

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod escape;
pub mod events;
pub mod fsutil;
pub mod fuzzing;
#[cfg(test)]
mod logcapture;
pub mod monitor;
pub mod phpctl;
pub mod pipeline;
pub mod state;
pub mod telemetry;
