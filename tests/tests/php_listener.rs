//! Runs the PHP test suite of `listener.php` (`php/tests/run.php`: profile fields, agent down,
//! kill switch and sample rate, datagram vs stream transport, both with the sockets extension and
//! the streams fallback) so that `cargo test` reports it. Fails in CI when `php` is missing.

use apm_tests::php;

#[test]
fn php_listener_suite_passes() {
    let Some(php_bin) = php::require("php (php8.2-cli)", php::php_cli()) else {
        return;
    };
    let out = std::process::Command::new(php_bin)
        .arg(php::repo_root().join("php/tests/run.php"))
        .current_dir(php::repo_root())
        .output()
        .expect("run php/tests/run.php");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let counts: Vec<u64> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        out.status.success(),
        "php/tests/run.php failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        last.ends_with(" passed, 0 failed") && counts.len() == 2 && counts[0] >= 40,
        "unexpected summary line {last:?} (expected at least 40 passed, 0 failed)"
    );
}
