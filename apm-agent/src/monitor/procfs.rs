//! The few /proc reads the monitor needs: RSS members the kernel has not reported yet, the
//! PHP-FPM pool of a worker, whether a process still exists.

use crate::escape::escape_control;
use apm_common::{RSS_ANON, RSS_FILE, RSS_MEMBERS, RSS_SHMEM, RSS_SWAP};

/// Whether process `pid` sees, at `path`, a file other than the one the agent sees there: it
/// lives in another mount namespace with its own socket at the agent's path. `false` when it
/// shares the agent's namespace, sees the agent's own socket (systemd's PrivateTmp and the
/// like), has nothing there, or is gone.
pub fn sees_other_file_at(pid: u32, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
    let (Some(theirs), Some(ours)) = (ns(&pid.to_string()), ns("self")) else {
        return false;
    };
    if theirs == ours {
        return false;
    }
    let rel = path.strip_prefix("/").unwrap_or(path);
    let Ok(t) =
        std::fs::symlink_metadata(std::path::Path::new(&format!("/proc/{pid}/root")).join(rel))
    else {
        return false;
    };
    match std::fs::symlink_metadata(path) {
        Ok(o) => (o.dev(), o.ino()) != (t.dev(), t.ino()),
        Err(_) => true,
    }
}

/// Pids of the running processes whose comm starts with one of `prefixes`.
pub fn pids_with_comm(prefixes: &[String]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = comm_of(*pid);
            prefixes.iter().any(|p| comm.starts_with(p.as_str()))
        })
        .collect()
}

/// RSS members of a process in bytes, indexed like `kmem/rss_stat` (`RSS_*`), from
/// `/proc/PID/status`. `None` when the process is gone.
pub fn rss_members(pid: u32) -> Option<[u64; RSS_MEMBERS]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status_members(&text))
}

pub fn parse_status_members(text: &str) -> [u64; RSS_MEMBERS] {
    let mut m = [0u64; RSS_MEMBERS];
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let idx = match key {
            "RssAnon" => RSS_ANON,
            "RssFile" => RSS_FILE,
            "RssShmem" => RSS_SHMEM,
            "VmSwap" => RSS_SWAP,
            _ => continue,
        };
        let kb = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        m[idx] = kb * 1024;
    }
    m
}

/// VmRSS of a process in bytes (for tests and cross-checks).
pub fn vm_rss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The pool label of a PHP process: PHP-FPM rewrites its argv to `php-fpm: pool NAME` (workers)
/// or `php-fpm: master process (...)`; anything else (the CLI) is labelled by its comm.
pub fn pool_of(pid: u32, comm: &str) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    pool_from_cmdline(&cmdline, comm)
}

pub fn pool_from_cmdline(cmdline: &[u8], comm: &str) -> String {
    let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let s = String::from_utf8_lossy(first);
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("php-fpm: pool ") {
        let name = rest.trim();
        if !name.is_empty() {
            let name: String = name.chars().take(64).collect();
            return escape_control(&name).into_owned();
        }
    }
    if s.starts_with("php-fpm: master process") {
        return "master".into();
    }
    // Already escaped by `comm_str` / `comm_of`.
    comm.to_string()
}

pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A comm as a string, up to its first NUL, control characters escaped (a process names
/// itself: see `crate::escape`).
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    escape_control(&String::from_utf8_lossy(&comm[..end])).into_owned()
}

/// `/proc/PID/comm`, escaped like [`comm_str`]; empty when the process is gone.
pub fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| escape_control(s.strip_suffix('\n').unwrap_or(&s)).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_members_parse() {
        let text = "Name:\tphp-fpm8.2\nVmRSS:\t   12396 kB\nRssAnon:\t    4000 kB\n\
                    RssFile:\t    8000 kB\nRssShmem:\t     396 kB\nVmSwap:\t       4 kB\n";
        let m = parse_status_members(text);
        assert_eq!(m[RSS_ANON], 4000 * 1024);
        assert_eq!(m[RSS_FILE], 8000 * 1024);
        assert_eq!(m[RSS_SHMEM], 396 * 1024);
        assert_eq!(m[RSS_SWAP], 4 * 1024);
    }

    #[test]
    fn pools_from_cmdline() {
        assert_eq!(
            pool_from_cmdline(b"php-fpm: pool www          \0\0", "php-fpm8.2"),
            "www"
        );
        assert_eq!(
            pool_from_cmdline(
                b"php-fpm: master process (/etc/php/8.2/fpm/php-fpm.conf)\0",
                "x"
            ),
            "master"
        );
        assert_eq!(pool_from_cmdline(b"php\0/tmp/x.php\0", "php"), "php");
        assert_eq!(pool_from_cmdline(b"", "php8.2"), "php8.2");
    }

    /// A process can name itself anything (prctl PR_SET_NAME, argv): control characters in a
    /// comm or pool name come out escaped, so they cannot forge log lines or status fields.
    #[test]
    fn comms_and_pools_with_control_characters_are_escaped() {
        assert_eq!(
            comm_str(b"php\nFORGED x\x1b\0\0\0"),
            "php\\nFORGED x\\u{1b}"
        );
        assert_eq!(
            pool_from_cmdline(b"php-fpm: pool www\nFORGED line\0", "php-fpm8.2"),
            "www\\nFORGED line"
        );
        assert_eq!(pool_from_cmdline(b"php\0", "php\\rX"), "php\\rX");
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(alive(me));
        let m = rss_members(me).unwrap();
        assert!(m[RSS_ANON] > 0);
        assert!(vm_rss(me).unwrap() > 0);
        assert_eq!(comm_str(b"php-fpm8.2\0\0\0\0\0\0"), "php-fpm8.2");
    }
}
