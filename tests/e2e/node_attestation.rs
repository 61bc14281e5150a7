//! Node attestation of real fleets: `x509pop` (a node certificate from a CA
//! the server trusts, and proof of possession of its key) and `k8s_psat` (a
//! projected service account token whose issuer's JWKS the server has).
//! Agents of these attestors attest again by themselves after an eviction.
//! Node aliases select agents by the node selectors their attestor vouched
//! for, and a k8s_psat token stays bound to its agent across restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

use crate::support::*;

/// How long an agent may take to attest and serve.
const READY: Duration = Duration::from_secs(30);

/// A node CA and the PEM of its certificate.
pub struct NodeCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl NodeCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// A node certificate for `cn`; returns (certificate PEM, DER, key PEM).
    pub fn issue(&self, cn: &str) -> (String, Vec<u8>, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![format!("{cn}.nodes.test")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(86400)).into();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), cert.der().to_vec(), key.serialize_pem())
    }
}

/// Lowercase hex SHA-1, as the x509pop agent IDs and selectors use.
pub fn sha1_hex(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The serial number of a certificate as x509pop selectors spell it: the
/// integer in lowercase hex, without leading zeros.
fn serial_selector_value(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    hex(cert.raw_serial()).trim_start_matches('0').to_owned()
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A server whose configuration file enables node attestors.
fn server(dir: &Path, node_attestors: &str) -> Server {
    let config = write(dir, "server.toml", node_attestors);
    Server::start_with(dir, &["--config", config.to_str().unwrap()])
}

/// A `sigil-agent` with a configuration file (the node attestor lives
/// there).
struct NodeAgent {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    data_dir: PathBuf,
}

impl NodeAgent {
    fn command(server: &Server, name: &str, node_attestor: &str) -> (Command, PathBuf) {
        let dir = server.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = dir.join("bootstrap.pem");
        server.write_bundle(&bundle);
        let config = write(&dir, "agent.toml", node_attestor);
        let mut cmd = Command::new(agent_bin());
        cmd.args([
            "run",
            "--trust-domain",
            TD,
            "--server-address",
            &server.address,
        ])
        .arg("--config")
        .arg(&config)
        .arg("--trust-bundle-path")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket-path")
        .arg(dir.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap());
        (cmd, dir)
    }

    /// Starts an agent and waits until it serves.
    fn start(server: &Server, name: &str, node_attestor: &str) -> Self {
        let (mut cmd, dir) = Self::command(server, name, node_attestor);
        let mut child = cmd.spawn().unwrap();
        let ready = dir.join("data/ready");
        let deadline = std::time::Instant::now() + READY;
        while !ready.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                panic!("sigil-agent exited with {status} before it was ready: {log}");
            }
            assert!(std::time::Instant::now() < deadline, "agent not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            socket: dir.join("api.sock"),
            data_dir: dir.join("data"),
            dir,
        }
    }

    /// Runs an agent that must fail; returns its exit status and log.
    fn run_to_failure(
        server: &Server,
        name: &str,
        node_attestor: &str,
    ) -> (std::process::ExitStatus, String) {
        let (mut cmd, dir) = Self::command(server, name, node_attestor);
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + READY;
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
        (
            status,
            std::fs::read_to_string(dir.join("agent.log")).unwrap(),
        )
    }

    fn spiffe_id(&self) -> String {
        let pem = std::fs::read(self.data_dir.join("agent_svid.pem")).unwrap();
        let leaf = pem::parse_many(&pem).unwrap().remove(0);
        sigil::x509::spiffe_id_of(leaf.contents())
            .unwrap()
            .to_string()
    }

    /// The SPIFFE IDs the Workload API serves the test process.
    fn fetched(&self) -> String {
        let out = self.fetch();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    }

    /// `sigil-agent api fetch x509` on this agent's socket, succeeding or not.
    fn fetch(&self) -> std::process::Output {
        output_of(
            Command::new(agent_bin())
                .args(["api", "fetch", "x509", "--socket-path"])
                .arg(&self.socket),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node CA, the server trusting it, and the files of one node.
pub struct X509Fleet {
    _dir: tempfile::TempDir,
    pub server: Server,
    pub ca: NodeCa,
    pub ca_der: Vec<u8>,
}

impl X509Fleet {
    pub fn start() -> Self {
        let dir = scratch();
        let ca = NodeCa::new("Node CA");
        let ca_path = write(dir.path(), "node-ca.pem", &ca.pem);
        let ca_der = pem::parse(&ca.pem).unwrap().into_contents();
        let server = server(
            dir.path(),
            &format!(
                "[node_attestors.x509pop]\nca_bundle_path = {:?}\n",
                ca_path.display().to_string()
            ),
        );
        Self {
            _dir: dir,
            server,
            ca,
            ca_der,
        }
    }

    /// Writes a node's certificate and key; returns the agent's
    /// `[node_attestor]` table and the certificate's DER.
    fn node(&self, name: &str, key_pem: Option<&str>) -> (String, Vec<u8>) {
        let dir = self.server.dir.join(format!("{name}-node"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, der, key) = self.ca.issue(name);
        let cert_path = write(&dir, "node.pem", &cert);
        let key_path = write(&dir, "node-key.pem", key_pem.unwrap_or(&key));
        (
            format!(
                "[node_attestor.x509pop]\ncertificate_path = {:?}\nprivate_key_path = {:?}\n",
                cert_path.display().to_string(),
                key_path.display().to_string()
            ),
            der,
        )
    }
}

#[test]
fn an_x509pop_agent_attests_and_serves_its_workloads() {
    let fleet = X509Fleet::start();
    let server = &fleet.server;
    let (table, der) = fleet.node("node-a", None);
    let agent = NodeAgent::start(server, "agent-a", &table);
    let agent_id = format!("spiffe://{TD}/sigil/agent/x509pop/{}", sha1_hex(&der));
    assert_eq!(agent.spiffe_id(), agent_id);

    let uid = own_uid_selector();
    server.create_entry(
        &format!("spiffe://{TD}/web"),
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually("the workload SVID", READY, || {
        agent
            .fetched()
            .contains(&format!("spiffe://{TD}/web"))
            .then_some(())
    });

    let shown: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "agent",
        "show",
        "--spiffe-id",
        &agent_id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["attestation_type"], "x509pop", "{shown}");
    let mut selectors: Vec<String> = shown["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["type"].as_str().unwrap(),
                s["value"].as_str().unwrap()
            )
        })
        .collect();
    selectors.sort();
    let mut expected = vec![
        format!("x509pop:ca:fingerprint:{}", sha1_hex(&fleet.ca_der)),
        "x509pop:san:dns:node-a.nodes.test".to_owned(),
        format!("x509pop:serialnumber:{}", serial_selector_value(&der)),
        "x509pop:subject:cn:node-a".to_owned(),
    ];
    expected.sort();
    assert_eq!(selectors, expected);

    let listed: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "agent",
        "list",
        "--attestation-type",
        "x509pop",
        "--output",
        "json",
    ]))
    .unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [agent_id.as_str()]);
}

#[test]
fn a_node_alias_selects_agents_by_their_x509pop_selectors() {
    let fleet = X509Fleet::start();
    let server = &fleet.server;
    let (table, _) = fleet.node("web-1", None);
    let web_1 = NodeAgent::start(server, "agent-web-1", &table);
    let (table, _) = fleet.node("web-2", None);
    let web_2 = NodeAgent::start(server, "agent-web-2", &table);

    let server_id = format!("spiffe://{TD}/sigil/server");
    let alias = format!("spiffe://{TD}/nodes/web");
    let app = format!("spiffe://{TD}/web-app");
    let by_ca = format!("x509pop:ca:fingerprint:{}", sha1_hex(&fleet.ca_der));
    let alias_entry = server.create_entry(&alias, &server_id, &[by_ca.as_str()], &[]);
    let alias_entry_id = alias_entry["id"].as_str().unwrap().to_owned();
    let uid = own_uid_selector();
    server.create_entry(&app, &alias, &[uid.as_str()], &[]);
    for agent in [&web_1, &web_2] {
        eventually("the alias's entry served", READY, || {
            let out = agent.fetch();
            (out.status.success() && stdout(&out).contains(&app)).then_some(())
        });
    }

    // The alias now selects web-1 only: web-2's workload loses the identity.
    server.cli_ok(&[
        "entry",
        "update",
        "--entry-id",
        &alias_entry_id,
        "--spiffe-id",
        &alias,
        "--parent-id",
        &server_id,
        "--selector",
        "x509pop:subject:cn:web-1",
    ]);
    let refused = eventually("web-2 loses the identity", READY, || {
        let out = web_2.fetch();
        (!out.status.success()).then(|| stderr(&out))
    });
    assert_eq!(refused, "Error: permission denied: no identity issued\n");
    let out = web_1.fetch();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&app), "{}", stdout(&out));
}

#[test]
fn agents_without_the_node_key_or_a_trusted_certificate_are_refused() {
    let fleet = X509Fleet::start();
    let server = &fleet.server;

    // The key file holds another key: the agent names the mistake.
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    let (table, _) = fleet.node("node-b", Some(&other_key));
    let (status, log) = NodeAgent::run_to_failure(server, "agent-b", &table);
    assert!(!status.success());
    assert!(
        log.contains("private_key_path is not the key of the certificate in"),
        "{log}"
    );

    // A certificate from a CA the server does not trust: the server refuses.
    let stranger = NodeCa::new("Node CA");
    let dir = server.dir.join("stranger");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, _, key) = stranger.issue("node-c");
    let table = format!(
        "[node_attestor.x509pop]\ncertificate_path = {:?}\nprivate_key_path = {:?}\n",
        write(&dir, "node.pem", &cert).display().to_string(),
        write(&dir, "node-key.pem", &key).display().to_string()
    );
    let (status, log) = NodeAgent::run_to_failure(server, "agent-c", &table);
    assert!(!status.success());
    assert!(
        log.contains(
            "attestation refused: params.data.payload: the certificate chain does not verify against the x509pop CA bundle"
        ),
        "{log}"
    );
    assert_eq!(server.cli_ok(&["agent", "count"]), "0 agents\n");
}

#[test]
fn an_evicted_x509pop_agent_attests_again_and_keeps_serving() {
    let fleet = X509Fleet::start();
    let server = &fleet.server;
    let (table, _) = fleet.node("node-d", None);
    let mut agent = NodeAgent::start(server, "agent-d", &table);
    let agent_id = agent.spiffe_id();
    let uid = own_uid_selector();
    server.create_entry(
        &format!("spiffe://{TD}/before"),
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually("the first SVID", READY, || {
        agent.fetched().contains("/before").then_some(())
    });

    assert_eq!(
        server.cli_ok(&["agent", "evict", "--spiffe-id", &agent_id]),
        format!("Agent {agent_id} evicted\n")
    );
    // The refused agent attests again with its certificate, by itself.
    eventually("the agent attests again", Duration::from_secs(90), || {
        agent
            .log()
            .contains("attested to the server again")
            .then_some(())
    });
    assert!(agent.is_running(), "{}", agent.log());
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent_id]);
    assert!(shown.contains("x509pop:subject:cn:node-d"), "{shown}");

    // It keeps serving, and gets what is registered after.
    server.create_entry(
        &format!("spiffe://{TD}/after"),
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually("the SVID of a new entry", Duration::from_secs(60), || {
        let fetched = agent.fetched();
        (fetched.contains("/before") && fetched.contains("/after")).then_some(())
    });
    assert!(agent.is_running());
}

#[test]
fn a_banned_x509pop_agent_attests_again_once_unbanned() {
    let dir = scratch();
    let ca = NodeCa::new("Node CA");
    let ca_path = write(dir.path(), "node-ca.pem", &ca.pem);
    let config = write(
        dir.path(),
        "server.toml",
        &format!(
            "[node_attestors.x509pop]\nca_bundle_path = {:?}\n",
            ca_path.display().to_string()
        ),
    );
    // Short agent SVIDs, so that the SVID expires during the ban.
    let server = Server::start_with(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--agent-svid-ttl",
            "6s",
        ],
    );
    let fleet = X509Fleet {
        _dir: dir,
        server,
        ca,
        ca_der: Vec::new(),
    };
    let server = &fleet.server;
    let (table, _) = fleet.node("node-e", None);
    let mut agent = NodeAgent::start(server, "agent-e", &table);
    let agent_id = agent.spiffe_id();
    let uid = own_uid_selector();
    server.create_entry(
        &format!("spiffe://{TD}/before"),
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually("the first SVID", READY, || {
        agent.fetched().contains("/before").then_some(())
    });

    server.cli_ok(&["agent", "ban", "--spiffe-id", &agent_id]);
    // Its SVID expires during the ban; attesting again is refused while
    // the ban lasts, and retried.
    let banned = format!("attestation refused: agent {agent_id} is banned");
    eventually("a refused attestation", Duration::from_secs(60), || {
        agent.log().contains(&banned).then_some(())
    });
    assert!(agent.is_running(), "{}", agent.log());
    assert!(agent.fetched().contains("/before"));

    server.cli_ok(&["agent", "unban", "--spiffe-id", &agent_id]);
    eventually("the agent attests again", Duration::from_secs(90), || {
        agent
            .log()
            .contains("attested to the server again")
            .then_some(())
    });
    server.create_entry(
        &format!("spiffe://{TD}/after"),
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually("the SVID of a new entry", Duration::from_secs(60), || {
        agent.fetched().contains("/after").then_some(())
    });
    assert!(agent.is_running());
}

/// A server trusting the JWKS of a k8s service account issuer for each of
/// `clusters`, and a projected token of the agent's pod, signed by it.
struct K8sFleet {
    _dir: tempfile::TempDir,
    server: Server,
    token: String,
    token_path: PathBuf,
}

impl K8sFleet {
    fn start(clusters: &[&str]) -> Self {
        let dir = scratch();
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": "sa-key-1", "alg": "ES256", "use": "sig",
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
        }]});
        let jwks_path = write(dir.path(), "jwks.json", &jwks.to_string());
        let config: String = clusters
            .iter()
            .map(|cluster| {
                format!(
                    "[node_attestors.k8s_psat.clusters.{cluster}]\njwks_path = {:?}\nissuer = \"https://kubernetes.default.svc\"\nallowed_service_accounts = [\"sigil:sigil-agent\"]\n",
                    jwks_path.display().to_string()
                )
            })
            .collect();
        let server = server(dir.path(), &config);

        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc",
            "aud": ["sigil-server"],
            "sub": "system:serviceaccount:sigil:sigil-agent",
            "iat": now, "nbf": now, "exp": now + 3600,
            "kubernetes.io": {
                "namespace": "sigil",
                "serviceaccount": { "name": "sigil-agent", "uid": "5a1b" },
                "pod": { "name": "sigil-agent-x7k2p", "uid": "9f3c-pod" },
                "node": { "name": "worker-1", "uid": "77aa-node" },
            },
        });
        let token = sign_jwt(pkcs8.as_ref(), "sa-key-1", &claims);
        let token_path = write(dir.path(), "sigil-agent.token", &token);
        Self {
            _dir: dir,
            server,
            token,
            token_path,
        }
    }

    /// The agent's `[node_attestor]` table for `cluster`.
    fn node_attestor(&self, cluster: &str) -> String {
        format!(
            "[node_attestor.k8s_psat]\ncluster = {cluster:?}\ntoken_path = {:?}\n",
            self.token_path.display().to_string()
        )
    }
}

/// Signs `claims` as an ES256 JWT with key ID `kid`.
fn sign_jwt(pkcs8: &[u8], kid: &str, claims: &serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
    let input = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng).unwrap();
    let signature = pair.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", b64.encode(signature.as_ref()))
}

#[test]
fn a_k8s_psat_agent_attests_with_its_projected_token() {
    let fleet = K8sFleet::start(&["e2e"]);
    let (server, token) = (&fleet.server, &fleet.token);
    let agent = NodeAgent::start(server, "agent-k", &fleet.node_attestor("e2e"));
    let agent_id = format!("spiffe://{TD}/sigil/agent/k8s_psat/e2e/77aa-node");
    assert_eq!(agent.spiffe_id(), agent_id);
    let shown = server.cli_ok(&["agent", "show", "--spiffe-id", &agent_id]);
    for selector in [
        "k8s_psat:cluster:e2e",
        "k8s_psat:agent_ns:sigil",
        "k8s_psat:agent_sa:sigil-agent",
        "k8s_psat:agent_pod_name:sigil-agent-x7k2p",
        "k8s_psat:agent_pod_uid:9f3c-pod",
        "k8s_psat:agent_node_name:worker-1",
    ] {
        assert!(shown.contains(selector), "{selector} missing in {shown}");
    }
    // The token is never logged.
    assert!(!server.log().contains(token));
    assert!(!agent.log().contains(token));

    let uid = own_uid_selector();
    server.create_entry(
        &format!("spiffe://{TD}/k8s-web"),
        &agent_id,
        &[uid.as_str()],
        &[],
    );
    eventually("the workload SVID", READY, || {
        agent.fetched().contains("/k8s-web").then_some(())
    });
}

#[test]
fn a_used_k8s_psat_token_attests_no_other_agent_after_a_restart() {
    // Two clusters share the issuer: the same token names one agent in
    // each.
    let mut fleet = K8sFleet::start(&["east", "west"]);
    let agent = NodeAgent::start(&fleet.server, "agent-east", &fleet.node_attestor("east"));
    let east_id = format!("spiffe://{TD}/sigil/agent/k8s_psat/east/77aa-node");
    assert_eq!(agent.spiffe_id(), east_id);
    drop(agent);

    fleet.server.restart();
    let (status, log) =
        NodeAgent::run_to_failure(&fleet.server, "agent-west", &fleet.node_attestor("west"));
    assert!(!status.success());
    assert!(
        log.contains("attestation refused: params.data.payload: token already used"),
        "{log}"
    );
    let listed = fleet.server.cli_ok(&["agent", "list", "--output", "json"]);
    assert!(listed.contains(&east_id), "{listed}");
    assert!(!listed.contains("/k8s_psat/west/"), "{listed}");

    // The agent the token attested may attest with it again.
    let again = NodeAgent::start(
        &fleet.server,
        "agent-east-again",
        &fleet.node_attestor("east"),
    );
    assert_eq!(again.spiffe_id(), east_id);
}
