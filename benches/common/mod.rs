//! Starting real Sigil processes for the benchmarks.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "shared by several benchmark binaries, each using a part"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sigil::proto::sigil::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

pub const TD: &str = "example.org";

/// Release binaries: `target/release`, or `SIGIL_BIN_DIR`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SIGIL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo build --release -p sigil-server -p sigil-agent",
        path.display()
    );
    path
}

/// Kills the process when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for_file(path: &Path, child: &mut Child) {
    for _ in 0..1500 {
        if path.exists() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not appear", path.display());
}

/// Starts `sigil-server` in `dir`; returns the process, its agent API
/// address and an admin client.
pub async fn start_server(dir: &Path) -> (Process, String, AdminClient<Channel>) {
    let data = dir.join("server");
    let admin = dir.join("admin.sock");
    let mut child = Command::new(bin("sigil-server"))
        .args([
            "run",
            "--trust-domain",
            TD,
            "--bind-address",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--admin-socket-path")
        .arg(&admin)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for_file(&data.join("ready"), &mut child);
    let address = std::fs::read_to_string(data.join("agent-api.addr"))
        .unwrap()
        .trim()
        .to_owned();
    let channel = sigil::transport::unix_channel(&admin).await.unwrap();
    (Process(child), address, AdminClient::new(channel))
}

/// Percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
