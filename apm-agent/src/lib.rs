//! The Bitville APM agent: a pipeline of stages, each owning its task and talking to the next
//! through bounded channels:
//!
//! ```text
//! ingest (dgram + stream sockets) -> batch -> breaker/spool -> transport (gRPC) -> listener
//!                      monitor (eBPF)    control (status, metrics, signals)
//! ```

pub mod batch;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod ingest;
pub mod liveness;
pub mod memguard;
pub mod model;
pub mod monitor;
pub mod phpctl;
pub mod pidfile;
pub mod router;
pub mod spool;
pub mod state;
pub mod telemetry;
pub mod transport;
