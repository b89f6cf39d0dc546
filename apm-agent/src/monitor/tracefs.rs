//! The running kernel's tracepoint record layouts, from tracefs
//! (`events/<category>/<event>/format`), checked against the offsets the programs were built
//! with (`apm_common::tp`) before anything loads: a kernel that moved or dropped a field is
//! refused with the field's name, instead of counted from zeros.

use std::path::{Path, PathBuf};

use apm_common::tp::{self, Field};

/// Where tracefs lives (the agent mounts it at the first one when neither is there).
const ROOTS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// The `field:` lines of a format file. `field:char comm[16]; offset:8; size:16; signed:0;`
/// gives `comm` at 8, 16 bytes.
pub fn parse_format(text: &str) -> Vec<FormatField> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let Some(decl) = parts.next() else { continue };
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.trim().parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.trim().parse().ok();
            }
        }
        // The name is the declaration's last word, without an array suffix.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("")
            .to_string();
        if let (Some(offset), Some(size), false) = (offset, size, name.is_empty()) {
            out.push(FormatField { name, offset, size });
        }
    }
    out
}

fn format_path(category: &str, event: &str) -> Option<PathBuf> {
    ROOTS
        .iter()
        .map(|r| {
            Path::new(r)
                .join("events")
                .join(category)
                .join(event)
                .join("format")
        })
        .find(|p| p.is_file())
}

fn read_fields(category: &str, event: &str) -> Result<Vec<FormatField>, String> {
    let p = format_path(category, event)
        .ok_or_else(|| format!("tracepoint {category}/{event} does not exist on this kernel"))?;
    let text =
        std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    Ok(parse_format(&text))
}

/// What a kernel's layouts allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `sched_process_exit` has `group_dead` where the programs read it.
    pub has_group_dead: bool,
}

/// Checks `want` against `fields` of one event; the error names the field and both layouts.
fn check_field(want: &Field, fields: &[FormatField]) -> Result<(), String> {
    match fields.iter().find(|f| f.name == want.name) {
        Some(f) if f.offset == want.offset && f.size == want.size => Ok(()),
        Some(f) => Err(format!(
            "tracepoint {}/{} field `{}` is at offset {} (size {}) on this kernel; the eBPF \
             programs read it at offset {} (size {})",
            want.category, want.event, want.name, f.offset, f.size, want.offset, want.size
        )),
        None => Err(format!(
            "tracepoint {}/{} has no field `{}` on this kernel",
            want.category, want.event, want.name
        )),
    }
}

/// Checks every field the programs read against this kernel's tracefs.
pub fn check_layouts() -> Result<Layout, String> {
    check_with(read_fields)
}

fn check_with(
    mut read: impl FnMut(&str, &str) -> Result<Vec<FormatField>, String>,
) -> Result<Layout, String> {
    let mut cache: Vec<((&str, &str), Vec<FormatField>)> = Vec::new();
    let mut fields_of = |c: &'static str, e: &'static str| -> Result<Vec<FormatField>, String> {
        if let Some((_, f)) = cache.iter().find(|(k, _)| *k == (c, e)) {
            return Ok(f.clone());
        }
        let f = read(c, e)?;
        cache.push(((c, e), f.clone()));
        Ok(f)
    };
    for want in tp::FIELDS {
        check_field(want, &fields_of(want.category, want.event)?)?;
    }
    let g = &tp::GROUP_DEAD;
    let exit = fields_of(g.category, g.event)?;
    let has_group_dead = if exit.iter().find(|f| f.name == g.name).is_none() {
        false
    } else {
        check_field(g, &exit)?;
        true
    };
    Ok(Layout { has_group_dead })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_6_1: &str = "name: sched_process_exit
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d prio=%d\", REC->comm, REC->pid, REC->prio
";

    #[test]
    fn parses_names_offsets_and_sizes() {
        let f = parse_format(EXIT_6_1);
        assert_eq!(f.len(), 7);
        assert_eq!(
            f[4],
            FormatField {
                name: "comm".into(),
                offset: 8,
                size: 16
            }
        );
        assert_eq!(f[5].name, "pid");
        let p = parse_format("\tfield:struct sockaddr * addr;\toffset:48;\tsize:8;\tsigned:0;");
        assert_eq!(p[0].name, "addr");
        assert_eq!((p[0].offset, p[0].size), (48, 8));
    }

    /// A fake tracefs built from `tp::FIELDS`, with `edit` applied to one event's fields.
    fn fake(
        edit: impl Fn(&str, &mut Vec<FormatField>),
    ) -> impl FnMut(&str, &str) -> Result<Vec<FormatField>, String> {
        move |c, e| {
            let mut v: Vec<FormatField> = tp::FIELDS
                .iter()
                .filter(|f| f.category == c && f.event == e)
                .map(|f| FormatField {
                    name: f.name.into(),
                    offset: f.offset,
                    size: f.size,
                })
                .collect();
            edit(e, &mut v);
            Ok(v)
        }
    }

    #[test]
    fn kernels_before_6_16_have_no_group_dead() {
        assert_eq!(
            check_with(fake(|_, _| {})),
            Ok(Layout {
                has_group_dead: false
            })
        );
        let with = check_with(fake(|e, v| {
            if e == "sched_process_exit" {
                v.push(FormatField {
                    name: "group_dead".into(),
                    offset: 32,
                    size: 1,
                });
            }
        }));
        assert_eq!(
            with,
            Ok(Layout {
                has_group_dead: true
            })
        );
    }

    #[test]
    fn a_moved_or_missing_field_is_refused_by_name() {
        let moved = check_with(fake(|e, v| {
            if e == "rss_stat" {
                v.iter_mut().find(|f| f.name == "size").unwrap().offset = 32;
            }
        }));
        let err = moved.unwrap_err();
        assert!(
            err.contains("kmem/rss_stat field `size` is at offset 32"),
            "{err}"
        );
        let missing = check_with(fake(|e, v| {
            if e == "sys_enter_sendto" {
                v.retain(|f| f.name != "addr_len");
            }
        }));
        assert!(missing.unwrap_err().contains("has no field `addr_len`"));
        let odd = check_with(fake(|e, v| {
            if e == "sched_process_exit" {
                v.push(FormatField {
                    name: "group_dead".into(),
                    offset: 36,
                    size: 1,
                });
            }
        }));
        assert!(odd.unwrap_err().contains("`group_dead` is at offset 36"));
    }

    #[test]
    fn this_kernel_has_the_layouts_the_programs_read() {
        if format_path("sched", "sched_process_exit").is_none() {
            return; // no tracefs here (not root): the privileged tests cover it
        }
        check_layouts().expect("this kernel's tracepoints");
    }
}
