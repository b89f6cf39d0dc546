//! The output file's line format: one JSON object per stored profile.
//!
//! ```text
//! {"agent_id":"a1","hostname":"web-1","seq":7,"batch_len":2,"batch_index":0,"received_ns":1,"pid":2,"uid":33,"rss_bytes":0,"profile":{...}}
//! ```
//!
//! Every envelope field comes before `profile` (or `invalid`/`profile_raw`), so recovery can read
//! the key of a line from its first bytes without parsing the payload. `batch_len` and
//! `batch_index` let recovery tell a complete batch from a torn one.

use apm_proto::Batch;
use serde::de::IgnoredAny;

/// A batch turned into its output lines, ready for the writer.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    /// The lines, each ending in `\n`; empty for a batch without profiles.
    pub lines: Vec<u8>,
    pub profiles: u64,
    /// Profiles whose payload was not valid UTF-8 JSON, stored as `profile_raw`.
    pub invalid: u64,
}

/// Appends `v` in decimal.
pub fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[plain_from..i]);
        if escape.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[usize::from(b >> 4)]);
            buf.push(HEX[usize::from(b & 0xf)]);
        } else {
            buf.extend_from_slice(escape);
        }
        plain_from = i + 1;
    }
    buf.extend_from_slice(&bytes[plain_from..]);
    buf.push(b'"');
}

/// Replaces every LF and CR byte by a space. The store is unconditional so that the loop
/// compiles to vector compare-and-blend instead of a branch per byte.
fn blank_line_breaks(bytes: &mut [u8]) {
    for b in bytes {
        let v = *b;
        *b = if v == b'\n' || v == b'\r' { b' ' } else { v };
    }
}

/// Whether a payload can be stored verbatim under `profile`: UTF-8 and one JSON value.
pub fn payload_is_json(payload: &[u8]) -> bool {
    simdutf8::basic::from_utf8(payload).is_ok_and(|s| serde_json::from_str::<IgnoredAny>(s).is_ok())
}

/// Encodes every profile of `batch` into `lines` (cleared first, its capacity reused).
pub fn encode_batch(batch: &Batch, mut lines: Vec<u8>) -> EncodedBatch {
    lines.clear();
    let n = batch.profiles.len();
    if n == 0 {
        return EncodedBatch {
            lines,
            ..EncodedBatch::default()
        };
    }
    let payload_bytes: usize = batch.profiles.iter().map(|p| p.payload.len()).sum();
    lines.reserve(payload_bytes + n * (160 + batch.agent_id.len() + batch.hostname.len()));

    // The part shared by every line of the batch, written once and copied.
    lines.extend_from_slice(b"{\"agent_id\":");
    push_json_str(&mut lines, &batch.agent_id);
    if batch.epoch != 0 {
        // Hex in a string, as in the agent's status: a JSON number loses bits in many readers.
        lines.extend_from_slice(b",\"epoch\":");
        push_json_str(&mut lines, &format!("{:016x}", batch.epoch));
    }
    lines.extend_from_slice(b",\"hostname\":");
    push_json_str(&mut lines, &batch.hostname);
    lines.extend_from_slice(b",\"seq\":");
    push_u64(&mut lines, batch.seq);
    lines.extend_from_slice(b",\"batch_len\":");
    push_u64(&mut lines, n as u64);
    lines.extend_from_slice(b",\"batch_index\":");
    let head_len = lines.len();

    let mut invalid = 0;
    for (i, p) in batch.profiles.iter().enumerate() {
        if i > 0 {
            lines.extend_from_within(..head_len);
        }
        push_u64(&mut lines, i as u64);
        lines.extend_from_slice(b",\"received_ns\":");
        push_u64(&mut lines, p.received_ns);
        lines.extend_from_slice(b",\"pid\":");
        push_u64(&mut lines, u64::from(p.pid));
        lines.extend_from_slice(b",\"uid\":");
        push_u64(&mut lines, u64::from(p.uid));
        lines.extend_from_slice(b",\"rss_bytes\":");
        push_u64(&mut lines, p.rss_bytes);
        if payload_is_json(&p.payload) {
            lines.extend_from_slice(b",\"profile\":");
            let start = lines.len();
            lines.extend_from_slice(&p.payload);
            // In valid JSON a raw LF/CR can only be whitespace: a space keeps the value and the
            // one-line-per-profile framing without reparsing.
            blank_line_breaks(&mut lines[start..]);
        } else {
            invalid += 1;
            lines.extend_from_slice(b",\"invalid\":true,\"profile_raw\":");
            push_json_str(&mut lines, &String::from_utf8_lossy(&p.payload));
        }
        lines.extend_from_slice(b"}\n");
    }
    EncodedBatch {
        lines,
        profiles: n as u64,
        invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apm_proto::Profile;
    use bytes::Bytes;
    use serde_json::{Value, json};

    fn profile(payload: &'static [u8]) -> Profile {
        Profile {
            payload: Bytes::from_static(payload),
            received_ns: 1_700_000_000_123_456_789,
            pid: 4242,
            uid: 33,
            rss_bytes: 12_345_678,
        }
    }

    fn batch(profiles: Vec<Profile>) -> Batch {
        Batch {
            agent_id: "agent-\"1\"".into(),
            hostname: "web\t1".into(),
            seq: u64::MAX,
            epoch: 0,
            profiles,
            host_stats: None,
        }
    }

    fn parse_lines(buf: &[u8]) -> Vec<Value> {
        assert_eq!(buf.last(), Some(&b'\n'));
        buf.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("line is JSON"))
            .collect()
    }

    #[test]
    fn numbers_format_like_display() {
        for v in [0, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut buf = Vec::new();
            push_u64(&mut buf, v);
            assert_eq!(buf, v.to_string().into_bytes());
        }
    }

    #[test]
    fn strings_escape_like_serde_json() {
        for s in [
            "",
            "plain",
            "q\"b\\s",
            "nl\ncr\rtab\t",
            "\u{1}\u{1f}",
            "ünï😀",
            "\u{7f}",
        ] {
            let mut buf = Vec::new();
            push_json_str(&mut buf, s);
            let back: String = serde_json::from_slice(&buf).expect("valid JSON string");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn one_line_per_profile_with_envelope() {
        let b = batch(vec![
            profile(br#"{"id":1,"s":"a\nb"}"#),
            profile(b"{\n  \"id\": 2,\r\n  \"x\": [1,\n2]\n}\n"),
        ]);
        let enc = encode_batch(&b, Vec::new());
        assert_eq!(enc.profiles, 2);
        assert_eq!(enc.invalid, 0);
        assert_eq!(enc.lines.iter().filter(|&&c| c == b'\n').count(), 2);
        let lines = parse_lines(&enc.lines);
        assert_eq!(
            lines[0],
            json!({"agent_id": "agent-\"1\"", "hostname": "web\t1", "seq": u64::MAX,
                   "batch_len": 2, "batch_index": 0, "received_ns": 1_700_000_000_123_456_789u64,
                   "pid": 4242, "uid": 33, "rss_bytes": 12_345_678,
                   "profile": {"id": 1, "s": "a\nb"}})
        );
        assert_eq!(lines[1]["batch_index"], 1);
        // Raw newlines became spaces; the value is unchanged.
        assert_eq!(lines[1]["profile"], json!({"id": 2, "x": [1, 2]}));
        let raw = std::str::from_utf8(&enc.lines).expect("utf8");
        assert!(
            raw.contains(r#""profile":{   "id": 2,    "x": [1, 2] } }"#),
            "{raw}"
        );
    }

    #[test]
    fn invalid_payloads_are_kept_as_strings() {
        let b = batch(vec![
            profile(b"{\"id\":1"),
            profile(b""),
            profile(b"\xff\xfe{}"),
            profile(b"{} {}"),
            profile(b"{\"ok\":true}"),
        ]);
        let enc = encode_batch(&b, Vec::new());
        assert_eq!(enc.invalid, 4);
        let lines = parse_lines(&enc.lines);
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["invalid"], true);
        assert_eq!(lines[0]["profile_raw"], "{\"id\":1");
        assert!(lines[0].get("profile").is_none());
        assert_eq!(lines[1]["profile_raw"], "");
        assert_eq!(lines[2]["profile_raw"], "\u{fffd}\u{fffd}{}");
        assert_eq!(lines[3]["profile_raw"], "{} {}");
        assert_eq!(lines[4]["profile"], json!({"ok": true}));
        assert!(lines[4].get("invalid").is_none());
    }

    #[test]
    fn empty_batch_has_no_lines_and_buffer_is_reused() {
        let enc = encode_batch(&batch(vec![]), Vec::with_capacity(4096));
        assert!(enc.lines.is_empty());
        assert!(enc.lines.capacity() >= 4096);
        let again = encode_batch(&batch(vec![profile(b"{}")]), enc.lines);
        assert_eq!(parse_lines(&again.lines).len(), 1);
    }
}
