//! The stream frame parser on arbitrary bytes delivered in arbitrary chunks: never panics, and
//! yields exactly the frames a straightforward reference parser finds in the whole input.
#![no_main]

use apm_agent::pipeline::ingest::stream::{Frame, next_frame};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fn reference(data: &[u8], max: usize) -> (Vec<Option<Vec<u8>>>, bool) {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > max {
            return (out, true);
        }
        if rest.len() < 4 + len {
            break;
        }
        out.push((len > 0).then(|| rest[4..4 + len].to_vec()));
        rest = &rest[4 + len..];
    }
    (out, false)
}

fuzz_target!(|input: &[u8]| {
    // Byte 0: size limit; byte 1: chunk size of the simulated reads.
    if input.len() < 2 {
        return;
    }
    let max = usize::from(input[0]) * 4;
    let chunk = usize::from(input[1]).max(1);
    let data = &input[2..];
    let (want, want_oversize) = reference(data, max);
    let mut got = Vec::new();
    let mut oversize = false;
    let mut buf = BytesMut::new();
    'read: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match next_frame(&mut buf, max) {
                Frame::Payload(p) => got.push(Some(p.to_vec())),
                Frame::Empty => got.push(None),
                Frame::Oversize(n) => {
                    assert!(n > max);
                    oversize = true;
                    break 'read;
                }
                Frame::Incomplete => break,
            }
        }
    }
    assert_eq!(got, want);
    assert_eq!(oversize, want_oversize);
});
