//! The agent <-> central listener protocol, generated from `proto/apm.proto`.

#[allow(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("bitville.apm.v1");
}

pub use v1::*;
