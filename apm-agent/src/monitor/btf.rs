//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where `comm` lives in
//! `struct task_struct`: the send programs read it with two loads instead of the
//! `bpf_get_current_comm` helper (a helper call costs ~20 ns per syscall on the tracepoints,
//! and the name check runs for every process on the host). Without BTF the programs use the
//! helper.

use std::path::Path;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const BTF_MAGIC: u16 = 0xeb9f;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_PTR: u32 = 2;

/// What the programs read of `task_struct` on the running kernel; `None` where its BTF lacks
/// the field or has it where the programs cannot read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.comm`: a 16-byte array at an 8-aligned offset (two 8-byte loads).
    pub comm: Option<u32>,
    /// `task_struct.self_exec_id` (u32 before 5.7, u64 since: the programs read its low half).
    pub exec_id: Option<u32>,
    /// `(task_struct.signal, signal_struct.live)`, for the exit program's `current->signal->live`.
    pub signal_live: Option<(u32, u32)>,
}

/// Reads `/sys/kernel/btf/vmlinux` once (5 MiB and more) and finds every offset in it. Read
/// once, not once per field: each read is a heap buffer of the file's size that glibc keeps
/// after the first (its mmap threshold grows to it), and the agent's start-up peak is its
/// memory high-water mark (docs/agent.md, "Where the memory goes").
pub fn task_offsets() -> TaskOffsets {
    std::fs::read(Path::new(VMLINUX)).map_or_else(|_| TaskOffsets::default(), |d| offsets_in(&d))
}

fn offsets_in(d: &[u8]) -> TaskOffsets {
    let Some(btf) = Btf::parse(d) else {
        return TaskOffsets::default();
    };
    TaskOffsets {
        comm: array_member(&btf, "task_struct", "comm", 16)
            .filter(|o| o.is_multiple_of(8) && *o != 0),
        exec_id: btf
            .member("task_struct", "self_exec_id")
            .and_then(|(_, bits)| (bits.is_multiple_of(32) && bits != 0).then_some(bits / 8)),
        signal_live: signal_live_offsets(&btf),
    }
}

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

/// Bytes of kind-specific data after a type's 12-byte header.
fn trailing(kind: u32, vlen: usize) -> usize {
    match kind {
        1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
        3 => 12,                      // ARRAY
        4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
        6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
        _ => 0,
    }
}

/// The type section of a BTF blob: where each type id starts.
struct Btf<'a> {
    d: &'a [u8],
    strs: usize,
    /// Type ids start at 1; `starts[id]` is where that type's header is.
    starts: Vec<usize>,
}

impl<'a> Btf<'a> {
    /// Little-endian BTF only (the hosts the agent runs on).
    fn parse(d: &'a [u8]) -> Option<Self> {
        if u16_at(d, 0)? != BTF_MAGIC {
            return None;
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = u32_at(d, 16)? as usize;
        let types = hdr_len.checked_add(type_off)?;
        let strs = hdr_len.checked_add(str_off)?;
        let mut starts = vec![0usize];
        let mut p = types;
        let end = types.checked_add(type_len)?;
        while p + 12 <= end {
            starts.push(p);
            let info = u32_at(d, p + 4)?;
            p += 12 + trailing((info >> 24) & 0x1f, (info & 0xffff) as usize);
        }
        Some(Self { d, strs, starts })
    }

    fn name(&self, off: u32) -> Option<&'a [u8]> {
        let s = self.d.get(self.strs + off as usize..)?;
        Some(&s[..s.iter().position(|&b| b == 0)?])
    }

    /// (type id, bit offset) of member `member` of the first struct named `st`.
    fn member(&self, st: &str, member: &str) -> Option<(u32, u32)> {
        for &p in &self.starts[1..] {
            let info = u32_at(self.d, p + 4)?;
            if (info >> 24) & 0x1f != KIND_STRUCT || self.name(u32_at(self.d, p)?)? != st.as_bytes()
            {
                continue;
            }
            let bitfields = info >> 31 != 0;
            for i in 0..(info & 0xffff) as usize {
                let m = p + 12 + 12 * i;
                if self.name(u32_at(self.d, m)?)? == member.as_bytes() {
                    let off = u32_at(self.d, m + 8)?;
                    let bits = if bitfields { off & 0x00ff_ffff } else { off };
                    return Some((u32_at(self.d, m + 4)?, bits));
                }
            }
            return None;
        }
        None
    }

    fn kind(&self, ty: u32) -> Option<u32> {
        let at = *self.starts.get(ty as usize)?;
        Some((u32_at(self.d, at + 4)? >> 24) & 0x1f)
    }
}

/// Byte offset of member `member` of struct `st`, which must be an array of `len` elements.
fn array_member(btf: &Btf<'_>, st: &str, member: &str, len: u32) -> Option<u32> {
    let (ty, bits) = btf.member(st, member)?;
    let at = *btf.starts.get(ty as usize)?;
    // ARRAY: { elem type, index type, nelems } after the header.
    if btf.kind(ty)? != KIND_ARRAY || u32_at(btf.d, at + 20)? != len || !bits.is_multiple_of(8) {
        return None;
    }
    Some(bits / 8)
}

/// Offsets of `task_struct.signal` (a pointer) and of `signal_struct.live` (an `atomic_t`),
/// 4-aligned and non-zero, for the exit program's `current->signal->live` read.
fn signal_live_offsets(btf: &Btf<'_>) -> Option<(u32, u32)> {
    let (sig_ty, sig_bits) = btf.member("task_struct", "signal")?;
    if btf.kind(sig_ty)? != KIND_PTR || !sig_bits.is_multiple_of(64) || sig_bits == 0 {
        return None;
    }
    let (_, live_bits) = btf.member("signal_struct", "live")?;
    if !live_bits.is_multiple_of(32) {
        return None;
    }
    Some((sig_bits / 8, live_bits / 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_comm_on_this_kernel_when_it_has_btf() {
        let Ok(data) = std::fs::read(VMLINUX) else {
            return;
        };
        let btf = Btf::parse(&data).expect("vmlinux BTF parses");
        let off = array_member(&btf, "task_struct", "comm", 16)
            .expect("task_struct.comm, a 16-byte array, in vmlinux BTF");
        assert!(off > 0, "{off}");
        let found = task_offsets();
        // Used only where the programs' 8-byte loads can read it.
        assert_eq!(found.comm, Some(off).filter(|o| o.is_multiple_of(8)));
        let (signal, live) = found.signal_live.expect("task_struct.signal->live");
        assert!(signal > 0 && live < 4096, "{signal} {live}");
        let exec = found.exec_id.expect("task_struct.self_exec_id");
        assert!(exec > 0 && exec.is_multiple_of(4), "{exec}");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(offsets_in(b""), TaskOffsets::default());
        assert_eq!(offsets_in(&[0u8; 64]), TaskOffsets::default());
        let mut d = vec![0u8; 64];
        d[..2].copy_from_slice(&BTF_MAGIC.to_le_bytes());
        d[4..8].copy_from_slice(&24u32.to_le_bytes());
        d[12..16].copy_from_slice(&1000u32.to_le_bytes()); // types past the end
        assert_eq!(offsets_in(&d), TaskOffsets::default());
    }
}
