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

/// Offset in bytes of `task_struct.comm`, when the running kernel's BTF has it as a 16-byte
/// array at an 8-aligned offset (what the programs' two 8-byte loads need).
pub fn task_comm_offset() -> Option<u32> {
    let data = std::fs::read(Path::new(VMLINUX)).ok()?;
    member_offset(&data, "task_struct", "comm", 16).filter(|o| o.is_multiple_of(8) && *o != 0)
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

/// Byte offset of member `member` of struct `st`, which must be an array of `len` elements.
/// Little-endian BTF only (the hosts the agent runs on).
fn member_offset(d: &[u8], st: &str, member: &str, len: u32) -> Option<u32> {
    if u16_at(d, 0)? != BTF_MAGIC {
        return None;
    }
    let hdr_len = u32_at(d, 4)? as usize;
    let type_off = u32_at(d, 8)? as usize;
    let type_len = u32_at(d, 12)? as usize;
    let str_off = u32_at(d, 16)? as usize;
    let types = hdr_len.checked_add(type_off)?;
    let strs = hdr_len.checked_add(str_off)?;
    let name = |off: u32| -> Option<&[u8]> {
        let s = d.get(strs + off as usize..)?;
        Some(&s[..s.iter().position(|&b| b == 0)?])
    };
    // Type ids start at 1; remember where each starts to resolve the member's type.
    let mut starts = vec![0usize];
    let mut found: Option<(u32, u32)> = None; // (member type id, bit offset)
    let mut p = types;
    let end = types.checked_add(type_len)?;
    while p + 12 <= end {
        starts.push(p);
        let name_off = u32_at(d, p)?;
        let info = u32_at(d, p + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfields = info >> 31 != 0;
        if found.is_none() && kind == KIND_STRUCT && name(name_off)? == st.as_bytes() {
            for i in 0..vlen {
                let m = p + 12 + 12 * i;
                if name(u32_at(d, m)?)? == member.as_bytes() {
                    let off = u32_at(d, m + 8)?;
                    let bits = if bitfields { off & 0x00ff_ffff } else { off };
                    found = Some((u32_at(d, m + 4)?, bits));
                }
            }
        }
        p += 12 + trailing(kind, vlen);
    }
    let (ty, bits) = found?;
    let at = *starts.get(ty as usize)?;
    let info = u32_at(d, at + 4)?;
    // ARRAY: { elem type, index type, nelems } after the header.
    if (info >> 24) & 0x1f != KIND_ARRAY || u32_at(d, at + 20)? != len || !bits.is_multiple_of(8) {
        return None;
    }
    Some(bits / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_comm_on_this_kernel_when_it_has_btf() {
        let Ok(data) = std::fs::read(VMLINUX) else {
            return;
        };
        let off = member_offset(&data, "task_struct", "comm", 16)
            .expect("task_struct.comm, a 16-byte array, in vmlinux BTF");
        assert!(off > 0, "{off}");
        // Used only where the programs' 8-byte loads can read it.
        assert_eq!(
            task_comm_offset(),
            Some(off).filter(|o| o.is_multiple_of(8))
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(member_offset(b"", "task_struct", "comm", 16), None);
        assert_eq!(member_offset(&[0u8; 64], "task_struct", "comm", 16), None);
        let mut d = vec![0u8; 64];
        d[..2].copy_from_slice(&BTF_MAGIC.to_le_bytes());
        d[4..8].copy_from_slice(&24u32.to_le_bytes());
        d[12..16].copy_from_slice(&1000u32.to_le_bytes()); // types past the end
        assert_eq!(member_offset(&d, "task_struct", "comm", 16), None);
    }
}
