//! Starts real `sigil-server` and `sigil-agent` processes for the end-to-end
//! tests, each in a directory of its own, and talks to them the way an
//! operator and a workload would: through the CLIs and the Workload API
//! socket.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const TD: &str = "example.org";

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding the built binaries: next to the test executable's
/// `deps/` folder, or `SIGIL_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIGIL_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn server_bin() -> PathBuf {
    built("sigil-server")
}

pub fn agent_bin() -> PathBuf {
    built("sigil-agent")
}

fn built(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (./tests/run does: cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A scratch directory that other uids can traverse (workloads run as other
/// users need to reach the agent socket and the binaries copied here).
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sigil-e2e-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Waits until `path` exists or the process exits.
fn wait_for_file(path: &Path, child: &mut Child, what: &str) {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited with {status} before it was ready");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not ready after {READY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM and waits; returns the exit status.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    child.wait().unwrap()
}

fn stderr_log(dir: &Path, name: &str) -> Stdio {
    let file = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Stdio::from(file)
}

/// A running `sigil-server`.
pub struct Server {
    child: Option<Child>,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub address: String,
    bind: String,
    extra_args: Vec<String>,
}

impl Server {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_on(dir, "127.0.0.1:0", extra_args)
    }

    /// Starts a server listening on `bind` (a fixed port survives restarts).
    pub fn start_on(dir: &Path, bind: &str, extra_args: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            dir: dir.to_path_buf(),
            data_dir: dir.join("server"),
            admin_socket: dir.join("server-admin.sock"),
            address: String::new(),
            bind: bind.to_owned(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let ready = self.data_dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(server_bin())
            .args(["run", "--trust-domain", TD, "--bind-address", &self.bind])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--admin-socket-path")
            .arg(&self.admin_socket)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(stderr_log(&self.dir, "server"))
            .spawn()
            .unwrap();
        wait_for_file(&ready, &mut child, "sigil-server");
        self.address = std::fs::read_to_string(self.data_dir.join("agent-api.addr"))
            .unwrap()
            .trim()
            .to_owned();
        self.child = Some(child);
    }

    /// Stops the server with SIGTERM; it must exit successfully.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = terminate(&mut child);
            assert!(status.success(), "sigil-server exited with {status}");
        }
    }

    /// Starts the server again on the same data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `sigil-server <args> --socket-path <admin socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(server_bin())
            .args(args)
            .arg("--socket-path")
            .arg(&self.admin_socket)
            .output()
            .unwrap()
    }

    /// Like [`Server::cli`], but the command must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sigil-server {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Generates a join token; returns (token, agent ID).
    pub fn token(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "generate", "--output", "json"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&args)).unwrap();
        (
            v["token"].as_str().unwrap().to_owned(),
            v["agent_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates an entry; returns it as JSON.
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> serde_json::Value {
        let mut args = vec![
            "entry",
            "create",
            "--output",
            "json",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
        ];
        for s in selectors {
            args.extend_from_slice(&["--selector", s]);
        }
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&args)).unwrap();
        v.as_array().and_then(|a| a.first().cloned()).unwrap_or(v)
    }

    /// The bundle as PEM, from `bundle show`.
    pub fn bundle_pem(&self) -> String {
        self.cli_ok(&["bundle", "show", "--format", "pem"])
    }

    /// Writes the bundle to a file an agent can bootstrap from.
    pub fn write_bundle(&self, path: &Path) {
        std::fs::write(path, self.bundle_pem()).unwrap();
    }

    /// Stores a bundle of one new authority for trust domain `name` with
    /// `bundle set`; returns that authority.
    pub fn set_foreign_bundle(&self, name: &str) -> sigil::x509::Authority {
        let td = sigil::TrustDomain::new(name).unwrap();
        let authority =
            sigil::x509::Authority::self_signed(&td, Duration::from_secs(3600)).unwrap();
        let path = self.dir.join(format!("{name}.pem"));
        std::fs::write(&path, sigil::bundle::cert_to_pem(authority.cert())).unwrap();
        self.cli_ok(&[
            "bundle",
            "set",
            "--id",
            &format!("spiffe://{name}"),
            "--path",
            path.to_str().unwrap(),
        ]);
        authority
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `sigil-agent`.
pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    server_address: String,
    bundle_path: PathBuf,
    name: String,
}

impl Agent {
    /// Starts an agent named `name` (its files go under `<dir>/<name>`)
    /// attesting with `token`, and waits until it serves.
    pub fn start(server: &Server, name: &str, token: Option<&str>) -> Self {
        let mut agent = Self::prepare(server, name);
        let mut child = agent.command(token).spawn().unwrap();
        wait_for_file(&agent.data_dir.join("ready"), &mut child, "sigil-agent");
        agent.child = Some(child);
        agent
    }

    fn prepare(server: &Server, name: &str) -> Self {
        let base = server.dir.join(name);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bundle_path = base.join("bootstrap.pem");
        server.write_bundle(&bundle_path);
        Self {
            child: None,
            dir: base.clone(),
            data_dir: base.join("data"),
            socket: base.join("api.sock"),
            server_address: server.address.clone(),
            bundle_path,
            name: name.to_owned(),
        }
    }

    fn command(&self, token: Option<&str>) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.args([
            "run",
            "--trust-domain",
            TD,
            "--server-address",
            &self.server_address,
        ])
        .arg("--trust-bundle-path")
        .arg(&self.bundle_path)
        .arg("--data-dir")
        .arg(&self.data_dir)
        .arg("--socket-path")
        .arg(&self.socket)
        .stdout(Stdio::null())
        .stderr(stderr_log(&self.dir, "agent"));
        if let Some(token) = token {
            cmd.args(["--join-token", token]);
        }
        cmd
    }

    /// Runs an agent that is expected to fail; returns its exit status and
    /// what it printed on stderr.
    pub fn run_to_failure(
        server: &Server,
        name: &str,
        token: Option<&str>,
        bundle_pem: Option<&str>,
    ) -> (std::process::ExitStatus, String) {
        let agent = Self::prepare(server, name);
        if let Some(pem) = bundle_pem {
            std::fs::write(&agent.bundle_path, pem).unwrap();
        }
        let mut child = agent.command(token).spawn().unwrap();
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("sigil-agent {name} did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(agent.dir.join("agent.log")).unwrap();
        (status, log)
    }

    /// Stops the agent with SIGTERM; it must exit successfully.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = terminate(&mut child);
            assert!(
                status.success(),
                "sigil-agent {} exited with {status}",
                self.name
            );
        }
    }

    /// Waits up to `timeout` for the agent to exit on its own; returns its
    /// exit status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the agent is running");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sigil-agent {} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the agent again on the same data directory, without a token.
    pub fn restart(&mut self) {
        self.stop();
        let mut child = self.command(None).spawn().unwrap();
        wait_for_file(&self.data_dir.join("ready"), &mut child, "sigil-agent");
        self.child = Some(child);
    }

    /// `unix:///path/to/api.sock`, for SPIFFE_ENDPOINT_SOCKET.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The agent's own SPIFFE ID, from its stored SVID.
    pub fn spiffe_id(&self) -> String {
        let pem = std::fs::read(self.data_dir.join("agent_svid.pem")).unwrap();
        let leaf = pem::parse_many(&pem).unwrap().remove(0);
        sigil::x509::spiffe_id_of(leaf.contents())
            .unwrap()
            .to_string()
    }

    /// Runs `sigil-agent api fetch x509` as `uid` (or as the test process),
    /// writing the files into `out` when given.
    pub fn fetch(&self, uid: Option<u32>, out: Option<&Path>) -> Output {
        let bin = match uid {
            Some(_) => copy_for_others(&agent_bin(), &self.dir),
            None => agent_bin(),
        };
        let mut cmd = Command::new(bin);
        cmd.args(["api", "fetch", "x509", "--socket-path"])
            .arg(&self.socket);
        if let Some(out) = out {
            cmd.arg("--write").arg(out);
        }
        as_uid(&mut cmd, uid);
        output_of(&mut cmd)
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the command as `uid` (with the same gid), when given.
pub fn as_uid(cmd: &mut Command, uid: Option<u32>) {
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid).env_remove("HOME").env("HOME", "/tmp");
    }
}

/// Workloads under other uids cannot read binaries from a private
/// checkout; copy the binary into the (world-readable) scratch directory.
pub fn copy_for_others(bin: &Path, dir: &Path) -> PathBuf {
    let target = dir.join(bin.file_name().unwrap());
    if !target.exists() {
        std::fs::copy(bin, &target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    target
}

/// Runs a command to completion. A binary copied moments ago can be
/// briefly unexecutable ("text file busy") while a child forked by another
/// test thread still holds the copy's file descriptor; that is retried.
pub fn output_of(cmd: &mut Command) -> Output {
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result.unwrap(),
        }
    }
    panic!("{cmd:?} stayed busy");
}

/// Spawns a command, retrying "text file busy" like [`output_of`].
pub fn spawn(cmd: &mut Command) -> Child {
    for _ in 0..100 {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result.unwrap(),
        }
    }
    panic!("{cmd:?} stayed busy");
}

/// Whether the tests run as root, which the multi-user tests need (to run
/// workloads under other uids).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A trust domain with one server and one agent whose entries are created
/// before the agent starts (so its first sync holds them).
pub struct Domain {
    pub dir: tempfile::TempDir,
    pub server: Server,
    pub agent: Agent,
    pub agent_id: String,
}

impl Domain {
    /// Starts a server, registers the entries `(spiffe path, selectors, extra
    /// flags)` under the agent, then starts the agent.
    pub fn start(entries: &[(&str, &[&str], &[&str])]) -> Self {
        let dir = scratch();
        let server = Server::start(dir.path());
        let (token, agent_id) = server.token(&["--spiffe-id", &format!("spiffe://{TD}/node/a")]);
        for (path, selectors, extra) in entries {
            server.create_entry(&format!("spiffe://{TD}{path}"), &agent_id, selectors, extra);
        }
        let agent = Agent::start(&server, "agent-a", Some(&token));
        Self {
            dir,
            server,
            agent,
            agent_id,
        }
    }
}

/// The test process's uid as a selector.
pub fn own_uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid().as_raw())
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Retries `f` until it returns `Some`, for state that another process
/// reaches on its own schedule (an entry propagating to an agent).
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A gRPC client of the agent API that authenticates as `agent`, with the
/// SVID, key and bundle the agent stored.
pub async fn agent_api_client(
    agent: &Agent,
    server: &Server,
) -> sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient<tonic::transport::Channel> {
    use std::sync::Arc;

    use sigil::bundle::X509Bundle;
    use sigil::keys::PrivateKey;
    use sigil::tls::{SpiffeServerVerifier, SvidResolver, TrustStore};

    let td = sigil::TrustDomain::new(TD).unwrap();
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        pem::parse_many(std::fs::read(agent.data_dir.join("agent_svid.pem")).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents().into())
            .collect();
    let key = PrivateKey::from_pem(
        &std::fs::read_to_string(agent.data_dir.join("agent_key.pem")).unwrap(),
    )
    .unwrap();
    let bundle = X509Bundle::from_pem(
        td.clone(),
        &std::fs::read(agent.data_dir.join("bundle.pem")).unwrap(),
    )
    .unwrap();

    let roots = Arc::new(TrustStore::new(&bundle).unwrap());
    let verifier = Arc::new(SpiffeServerVerifier::new(
        roots,
        td.id_with_path("/sigil/server").unwrap(),
    ));
    let identity = Arc::new(SvidResolver::new(chain, &key).unwrap());
    let config = Arc::new(sigil::tls::client_config(verifier, Some(identity)).unwrap());
    let channel = sigil::transport::tls_channel(&server.address, config);
    sigil::proto::sigil::agent::v1::agent_api_client::AgentApiClient::new(channel)
}

/// A raw Workload API client on the agent's socket, which sends only the
/// metadata the test adds.
pub async fn raw_workload_client(
    agent: &Agent,
) -> sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    let channel = sigil::transport::unix_channel(&agent.socket).await.unwrap();
    sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}
