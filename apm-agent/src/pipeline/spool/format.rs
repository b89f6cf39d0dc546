//! On-disk framing of spool segments (see docs/spool.md). All integers little-endian.
//!
//! Segment header (32 bytes): `"APMSPOOL"`, version u32, reserved u32 (0), segment id u64,
//! crc32c of the preceding 24 bytes u32, reserved u32 (0).
//!
//! Record (24-byte header + body): magic u32, body length u32, batch seq u64, profile count u32,
//! crc32c u32 over bytes 4..20 of the header followed by the body. The body is
//! [`crate::pipeline::model::Batch::encode_record`]; seq and profile count are repeated in the header so
//! that recovery and drop accounting never need to decode a batch.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const SEGMENT_MAGIC: [u8; 8] = *b"APMSPOOL";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: u64 = 32;

/// Not ASCII and not valid UTF-8 as a sequence, so JSON payloads rarely contain it.
pub const RECORD_MAGIC: u32 = 0xA9F1_5E0D;
pub const RECORD_HEADER_LEN: u64 = 24;
/// Larger bodies are corrupt lengths, not records (batches are at most 32 MiB).
pub const MAX_RECORD_BODY: u32 = 256 * 1024 * 1024;

pub fn segment_header(id: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub len: u32,
    pub seq: u64,
    pub profiles: u32,
    pub crc: u32,
}

impl RecordHeader {
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN + u64::from(self.len)
    }

    /// Parses a header whose magic and length are plausible; the crc is checked with the body.
    pub fn parse(b: &[u8; RECORD_HEADER_LEN as usize]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u32_at(0) != RECORD_MAGIC {
            return None;
        }
        let h = Self {
            len: u32_at(4),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            profiles: u32_at(16),
            crc: u32_at(20),
        };
        (h.len <= MAX_RECORD_BODY).then_some(h)
    }
}

fn record_crc(header: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[4..20]), body)
}

/// Frames one record: header and body in one buffer, so it is written with one `write`.
pub fn encode_record(seq: u64, profiles: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN as usize + body.len());
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&profiles.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(body);
    let crc = record_crc(&out[..20], body);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What is at an offset of a segment file.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// A valid record; its body is in the caller's buffer.
    Record(RecordHeader),
    /// The header or the body runs past the end of the file (with the header when it was
    /// readable: its profile count is what the tail held).
    Torn(Option<RecordHeader>),
    /// Bad magic, implausible length or checksum mismatch (with the header when its magic and
    /// length were plausible).
    Bad(Option<RecordHeader>),
}

/// Reads the record at `off` of a file of `file_len` bytes into `body`, checking its crc.
pub fn read_record_at(
    file: &File,
    off: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<ReadAt> {
    if off + RECORD_HEADER_LEN > file_len {
        return Ok(ReadAt::Torn(None));
    }
    let mut hb = [0u8; RECORD_HEADER_LEN as usize];
    file.read_exact_at(&mut hb, off)?;
    let Some(h) = RecordHeader::parse(&hb) else {
        return Ok(ReadAt::Bad(None));
    };
    if off + h.total_len() > file_len {
        return Ok(ReadAt::Torn(Some(h)));
    }
    body.resize(h.len as usize, 0);
    file.read_exact_at(body, off + RECORD_HEADER_LEN)?;
    if record_crc(&hb, body) != h.crc {
        return Ok(ReadAt::Bad(Some(h)));
    }
    Ok(ReadAt::Record(h))
}

/// Reads only the header at `off` (no crc check): used to step over records already handled.
pub fn read_header_at(file: &File, off: u64, file_len: u64) -> io::Result<Option<RecordHeader>> {
    if off + RECORD_HEADER_LEN > file_len {
        return Ok(None);
    }
    let mut hb = [0u8; RECORD_HEADER_LEN as usize];
    file.read_exact_at(&mut hb, off)?;
    Ok(RecordHeader::parse(&hb).filter(|h| off + h.total_len() <= file_len))
}

/// The offset of the first valid record strictly after `from`, scanning for the magic.
pub fn find_next_valid(
    file: &File,
    from: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<Option<u64>> {
    const CHUNK: usize = 64 * 1024;
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = from + 1;
    while pos + RECORD_HEADER_LEN <= file_len {
        let n = (file_len - pos).min(CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        for i in 0..n.saturating_sub(3) {
            if buf[i..i + 4] == magic
                && matches!(
                    read_record_at(file, pos + i as u64, file_len, body)?,
                    ReadAt::Record(_)
                )
            {
                return Ok(Some(pos + i as u64));
            }
        }
        // Overlap by 3 bytes so a magic split across chunks is seen.
        pos += (n as u64).saturating_sub(3).max(1);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        let f = File::open(t.path()).unwrap();
        (t, f)
    }

    #[test]
    fn record_roundtrip_and_every_single_bit_flip_is_caught() {
        let rec = encode_record(7, 3, b"hello spool");
        let (_t, f) = file_with(&rec);
        let mut body = Vec::new();
        let r = read_record_at(&f, 0, rec.len() as u64, &mut body).unwrap();
        assert_eq!(
            r,
            ReadAt::Record(RecordHeader {
                len: 11,
                seq: 7,
                profiles: 3,
                crc: u32::from_le_bytes(rec[20..24].try_into().unwrap())
            })
        );
        assert_eq!(body, b"hello spool");
        for bit in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let (_t, f) = file_with(&bad);
            let r = read_record_at(&f, 0, bad.len() as u64, &mut body).unwrap();
            assert!(
                matches!(r, ReadAt::Bad(_) | ReadAt::Torn(_)),
                "bit {bit} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn every_truncation_is_torn() {
        let rec = encode_record(1, 1, &[0xAB; 100]);
        let (_t, f) = file_with(&rec);
        let mut body = Vec::new();
        for len in 0..rec.len() as u64 {
            assert!(matches!(
                read_record_at(&f, 0, len, &mut body).unwrap(),
                ReadAt::Torn(_)
            ));
        }
    }

    #[test]
    fn resync_finds_the_next_record_after_garbage() {
        let mut bytes = encode_record(1, 1, b"first");
        let second_at = bytes.len() as u64 + 50;
        bytes.extend_from_slice(&[0x0D; 10]);
        bytes.extend_from_slice(&RECORD_MAGIC.to_le_bytes()); // a false magic
        bytes.extend_from_slice(&[0x5E; 36]);
        bytes.extend_from_slice(&encode_record(2, 1, b"second"));
        let (_t, f) = file_with(&bytes);
        let mut body = Vec::new();
        let len = bytes.len() as u64;
        assert_eq!(
            find_next_valid(&f, 0, len, &mut body).unwrap(),
            Some(second_at)
        );
        assert_eq!(
            find_next_valid(&f, second_at, len, &mut body).unwrap(),
            None
        );
    }

    #[test]
    fn segment_header_has_id_and_checksum() {
        let h = segment_header(42);
        assert_eq!(&h[0..8], b"APMSPOOL");
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 42);
        assert_ne!(segment_header(43)[24..28], h[24..28]);
    }
}
