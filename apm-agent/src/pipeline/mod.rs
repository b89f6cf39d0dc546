//! The stages a profile passes through, in order:
//!
//! 1. [`ingest`]: reads the datagram and stream sockets, validates, stamps the envelope;
//! 2. [`batch`]: seals batches by count, bytes or age and gives each its `seq`;
//! 3. [`router`]: owns every unacknowledged batch: memory window, [`spool`] on disk, the
//!    circuit [`breaker`], replay;
//! 4. [`transport`]: the gRPC stream to the central listener, acks back to the router.
//!
//! [`durable`] counts what only memory holds on the way (and in write-ahead mode bounds it).
//! [`model`] holds the types that travel between them; [`liveness`] the heartbeats every stage
//! gives the watchdog. The stages are wired together by `daemon::assemble`.

pub mod batch;
pub mod breaker;
pub mod durable;
pub mod ingest;
pub mod liveness;
pub mod model;
pub mod router;
pub mod spool;
pub mod transport;
