//! The domain types that flow through the pipeline, and their one conversion to and from the wire
//! types of `apm-proto` (also the spool's on-disk record body).

use bytes::Bytes;
use prost::Message;

/// One PHP request's profile. `payload` is the JSON exactly as received: a slice of the receive
/// arena, never copied again on its way to the listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub payload: Bytes,
    /// Wall-clock receive time, ns since the Unix epoch.
    pub received_ns: u64,
    pub pid: u32,
    pub uid: u32,
    /// Sender RSS at send time (eBPF); 0 when unknown.
    pub rss_bytes: u64,
}

/// A batch of profiles with its per-agent sequence number and the epoch of that sequence
/// (both assigned when the batch is sealed, kept through spool and replay so the listener can
/// deduplicate by `(agent_id, epoch, seq)`).
#[derive(Debug, Clone)]
pub struct Batch {
    pub seq: u64,
    pub epoch: u64,
    pub profiles: Vec<Profile>,
    /// When the batcher sealed it, until the transport first sends it: the seal -> ack time of
    /// batches that went straight through sets the batcher's lead (pipeline/batch.rs). `None`
    /// for a batch handed back, spooled or replayed. Bookkeeping: not on the wire, not in the
    /// spool, not compared.
    pub sealed_at: Option<tokio::time::Instant>,
}

impl PartialEq for Batch {
    fn eq(&self, o: &Self) -> bool {
        (self.seq, self.epoch, &self.profiles) == (o.seq, o.epoch, &o.profiles)
    }
}

impl Batch {
    pub fn payload_bytes(&self) -> usize {
        self.profiles.iter().map(|p| p.payload.len()).sum()
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    pub fn to_proto(
        &self,
        agent_id: &str,
        hostname: &str,
        host_stats: Option<apm_proto::HostStats>,
    ) -> apm_proto::Batch {
        apm_proto::Batch {
            agent_id: agent_id.to_string(),
            hostname: hostname.to_string(),
            seq: self.seq,
            epoch: self.epoch,
            profiles: self
                .profiles
                .iter()
                .map(|p| apm_proto::Profile {
                    payload: p.payload.clone(),
                    received_ns: p.received_ns,
                    pid: p.pid,
                    uid: p.uid,
                    rss_bytes: p.rss_bytes,
                })
                .collect(),
            host_stats,
        }
    }

    pub fn from_proto(b: apm_proto::Batch) -> Self {
        Self {
            seq: b.seq,
            epoch: b.epoch,
            sealed_at: None,
            profiles: b
                .profiles
                .into_iter()
                .map(|p| Profile {
                    payload: p.payload,
                    received_ns: p.received_ns,
                    pid: p.pid,
                    uid: p.uid,
                    rss_bytes: p.rss_bytes,
                })
                .collect(),
        }
    }

    /// Encodes the batch (without agent id or host stats) as the spool's record body.
    pub fn encode_record(&self) -> Vec<u8> {
        self.to_proto("", "", None).encode_to_vec()
    }

    /// Decodes a spool record body; payloads are slices of `buf`, not copies.
    pub fn decode_record(buf: Bytes) -> Result<Self, prost::DecodeError> {
        apm_proto::Batch::decode(buf).map(Self::from_proto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip() {
        let b = Batch {
            seq: 42,
            epoch: 7,
            sealed_at: None,
            profiles: vec![Profile {
                payload: Bytes::from_static(br#"{"a":1}"#),
                received_ns: 7,
                pid: 100,
                uid: 33,
                rss_bytes: 4096,
            }],
        };
        let back = Batch::decode_record(Bytes::from(b.encode_record())).unwrap();
        assert_eq!(back, b);
    }
}
