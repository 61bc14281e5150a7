//! An upstream authority (`[upstream_authority.disk]`): a CA made outside
//! Sigil signs the server's authorities as intermediates. Workloads get
//! leaf + intermediate(s), the trust bundle is the upstream root, and
//! OpenSSL, go-spiffe and py-spiffe verify the SVIDs to that root alone.
//! With `ca_key_type` and `workload_key_type`, the same holds for P-384
//! authorities and RSA workload keys.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use sigil::keys::{KeyType, PrivateKey};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::interop::{go_client, python_client};
use crate::support::*;

const ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";
const RSA_SHA256: &str = "1.2.840.113549.1.1.11";
const RSA_KEY: &str = "1.2.840.113549.1.1.1";

/// A CA made outside Sigil, as an operator's PKI would.
struct OutsideCa {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl OutsideCa {
    /// A CA named `cn` over a new key of `key_type`, self-signed or signed
    /// by `parent`, valid for a day.
    fn new(cn: &str, key_type: KeyType, parent: Option<&OutsideCa>) -> Self {
        let key = PrivateKey::generate(key_type).unwrap().key_pair().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // OpenSSL's strict mode wants an AKI on every certificate not
        // self-signed.
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(86_400)).into();
        let cert = match parent {
            None => params.self_signed(&key).unwrap(),
            Some(parent) => {
                let issuer = Issuer::from_ca_cert_der(&parent.cert, &parent.key).unwrap();
                params.signed_by(&key, &issuer).unwrap()
            }
        };
        Self {
            cert: cert.der().clone(),
            key,
        }
    }

    fn pem(&self) -> String {
        sigil::bundle::cert_to_pem(&self.cert)
    }
}

/// Writes the server's configuration: the upstream files (the signing CA's
/// certificate followed by `above`, and its key) and `extra` keys.
fn server_config(dir: &Path, signing: &OutsideCa, above: &[&OutsideCa], extra: &str) -> PathBuf {
    let cert_file = dir.join("upstream.pem");
    let key_file = dir.join("upstream.key");
    let chain: String = std::iter::once(signing)
        .chain(above.iter().copied())
        .map(OutsideCa::pem)
        .collect();
    std::fs::write(&cert_file, chain).unwrap();
    std::fs::write(&key_file, signing.key.serialize_pem()).unwrap();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\n[upstream_authority.disk]\ncert_file_path = {:?}\nkey_file_path = {:?}\n",
            cert_file.display().to_string(),
            key_file.display().to_string()
        ),
    )
    .unwrap();
    config
}

fn der_certs(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text.as_bytes())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

/// Fetches the caller's SVID with `sigil-agent api fetch x509 --write`,
/// once the agent has it; returns the directory holding the files.
fn fetch_written(socket: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("fetched");
    eventually("the workload's SVID", Duration::from_secs(30), || {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["api", "fetch", "x509", "--socket-path"])
            .arg(socket)
            .arg("--write")
            .arg(&out);
        output_of(&mut cmd).status.success().then_some(())
    });
    out
}

/// Splits the written chain into `leaf.pem` and `intermediates.pem` beside
/// it, and runs `openssl verify -x509_strict` against `root.pem`.
fn openssl_verifies(fetched: &Path, root: &OutsideCa) -> Vec<Vec<u8>> {
    let chain = der_certs(&std::fs::read_to_string(fetched.join("svid.0.pem")).unwrap());
    let pem_of = |certs: &[Vec<u8>]| -> String {
        certs
            .iter()
            .map(|c| sigil::bundle::cert_to_pem(&CertificateDer::from(c.as_slice())))
            .collect()
    };
    let leaf = fetched.join("leaf.pem");
    let intermediates = fetched.join("intermediates.pem");
    let root_file = fetched.join("root.pem");
    std::fs::write(&leaf, pem_of(&chain[..1])).unwrap();
    std::fs::write(&intermediates, pem_of(&chain[1..])).unwrap();
    std::fs::write(&root_file, root.pem()).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&root_file)
        .arg("-untrusted")
        .arg(&intermediates)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(stdout(&out).trim(), format!("{}: OK", leaf.display()));
    chain
}

/// Runs the go-spiffe or py-spiffe `fetch` (which verifies each SVID to
/// its trust domain's bundle) and checks what it saw.
fn client_fetch(client: &str, socket: &Path, id: &str, chain_len: usize) {
    let mut cmd = match client {
        "go-spiffe" => Command::new(go_client()),
        _ => {
            let mut cmd = Command::new("python3");
            cmd.arg(python_client());
            cmd
        }
    };
    let out = cmd
        .arg("fetch")
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{client}: {}", stderr(&out));
    let line = stdout(&out);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["svids"][0]["spiffe_id"], id, "{client}: {line}");
    assert_eq!(v["svids"][0]["chain_len"], chain_len, "{client}: {line}");
    assert_eq!(v["bundles"]["example.org"], 1, "{client}: the root alone");
}

fn signature_oid(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.signature_algorithm.algorithm.to_id_string()
}

fn key_oid(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.public_key().algorithm.algorithm.to_id_string()
}

#[test]
fn an_upstream_root_signs_the_authority_and_workloads_verify_to_it() {
    let dir = scratch();
    let root = OutsideCa::new("Example Upstream Root", KeyType::EcP256, None);
    let config = server_config(dir.path(), &root, &[], "");
    let server = Server::start_with(dir.path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(
        der_certs(&server.bundle_pem()),
        [root.cert.to_vec()],
        "the bundle is the upstream root"
    );

    let (token, agent_id) = server.token(&["--spiffe-id", &format!("spiffe://{TD}/node/a")]);
    let uid = own_uid_selector();
    server.create_entry(&format!("spiffe://{TD}/web"), &agent_id, &[&uid], &[]);
    // The agent attests, syncs and signs over mTLS with an intermediate
    // chain verified against the root alone.
    let agent = Agent::start(&server, "agent-a", Some(&token));

    let fetched = fetch_written(&agent.socket, dir.path());
    let chain = openssl_verifies(&fetched, &root);
    assert_eq!(chain.len(), 2, "leaf, then the server's intermediate");
    sigil::x509::check_leaf(&chain[0]).unwrap();
    sigil::x509::check_ca(&chain[1]).unwrap();
    assert_eq!(
        sigil::x509::spiffe_id_of(&chain[1]).unwrap().to_string(),
        "spiffe://example.org"
    );
    let bundle = std::fs::read_to_string(fetched.join("bundle.0.pem")).unwrap();
    assert_eq!(
        der_certs(&bundle),
        [root.cert.to_vec()],
        "the Workload API bundle is the upstream root"
    );

    let id = format!("spiffe://{TD}/web");
    client_fetch("go-spiffe", &agent.socket, &id, 2);
    client_fetch("py-spiffe", &agent.socket, &id, 2);
}

/// An agent started with `--config` (for `workload_key_type`).
struct ConfiguredAgent {
    child: Child,
    socket: PathBuf,
}

impl ConfiguredAgent {
    fn start(server: &Server, name: &str, token: &str, config: &str) -> Self {
        let base = server.dir.join(name);
        std::fs::create_dir_all(&base).unwrap();
        let bundle = base.join("bootstrap.pem");
        server.write_bundle(&bundle);
        let config_file = base.join("agent.toml");
        std::fs::write(&config_file, config).unwrap();
        let data_dir = base.join("data");
        let socket = base.join("api.sock");
        let log = std::fs::File::create(base.join("agent.log")).unwrap();
        let mut cmd = Command::new(agent_bin());
        cmd.args([
            "run",
            "--trust-domain",
            TD,
            "--server-address",
            &server.address,
        ])
        .arg("--config")
        .arg(&config_file)
        .arg("--trust-bundle-path")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--join-token", token])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        let mut child = spawn(&mut cmd);
        eventually("the agent is ready", Duration::from_secs(30), || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "sigil-agent exited with {status}: {}",
                    std::fs::read_to_string(base.join("agent.log")).unwrap_or_default()
                );
            }
            data_dir.join("ready").exists().then_some(())
        });
        Self { child, socket }
    }
}

impl Drop for ConfiguredAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn p384_authorities_under_an_upstream_intermediate_sign_rsa_workload_keys() {
    let dir = scratch();
    // An RSA root, and the P-256 intermediate below it that signs ours.
    let root = OutsideCa::new("Example Upstream Root", KeyType::Rsa2048, None);
    let middle = OutsideCa::new(
        "Example Upstream Intermediate",
        KeyType::EcP256,
        Some(&root),
    );
    let config = server_config(dir.path(), &middle, &[&root], "ca_key_type = \"ec-p384\"");
    let server = Server::start_with(dir.path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(der_certs(&server.bundle_pem()), [root.cert.to_vec()]);

    let (token, agent_id) = server.token(&["--spiffe-id", &format!("spiffe://{TD}/node/a")]);
    let uid = own_uid_selector();
    server.create_entry(&format!("spiffe://{TD}/rsa"), &agent_id, &[&uid], &[]);
    let agent = ConfiguredAgent::start(
        &server,
        "agent-rsa",
        &token,
        "workload_key_type = \"rsa-2048\"\n",
    );

    let fetched = fetch_written(&agent.socket, dir.path());
    let chain = openssl_verifies(&fetched, &root);
    assert_eq!(chain.len(), 3, "leaf, ours, the upstream intermediate");
    assert_eq!(chain[2], middle.cert.to_vec());
    sigil::x509::check_leaf(&chain[0]).unwrap();
    assert_eq!(key_oid(&chain[0]), RSA_KEY, "the workload key is RSA");
    assert_eq!(
        signature_oid(&chain[0]),
        ECDSA_SHA384,
        "signed by a P-384 key"
    );
    assert_eq!(
        signature_oid(&chain[1]),
        ECDSA_SHA256,
        "signed by the P-256 upstream"
    );
    assert_eq!(
        signature_oid(&chain[2]),
        RSA_SHA256,
        "signed by the RSA root"
    );
    let key = std::fs::read_to_string(fetched.join("svid.0.key")).unwrap();
    assert_eq!(
        PrivateKey::from_pem(&key)
            .unwrap()
            .key_pair()
            .unwrap()
            .algorithm(),
        KeyType::Rsa2048.signature_algorithm()
    );

    let id = format!("spiffe://{TD}/rsa");
    client_fetch("go-spiffe", &agent.socket, &id, 3);
    client_fetch("py-spiffe", &agent.socket, &id, 3);
}

#[test]
fn the_intermediate_rotates_and_the_bundle_stays_the_root() {
    let dir = scratch();
    let root = OutsideCa::new("Example Upstream Root", KeyType::EcP256, None);
    let config = server_config(dir.path(), &root, &[], "");
    // The next intermediate is prepared at 15 s and signs from 25 s on.
    let server = Server::start_with(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--ca-ttl",
            "30s",
            "--default-x509-svid-ttl",
            "5s",
        ],
    );
    let (token, agent_id) = server.token(&["--spiffe-id", &format!("spiffe://{TD}/node/a")]);
    let uid = own_uid_selector();
    server.create_entry(&format!("spiffe://{TD}/web"), &agent_id, &[&uid], &[]);
    let agent = Agent::start(&server, "agent-a", Some(&token));

    let fetched = fetch_written(&agent.socket, dir.path());
    let first = openssl_verifies(&fetched, &root);
    let rotated = eventually(
        "an SVID signed by the next intermediate",
        Duration::from_secs(60),
        || {
            let fetched = fetch_written(&agent.socket, dir.path());
            let chain = der_certs(&std::fs::read_to_string(fetched.join("svid.0.pem")).unwrap());
            (chain[1] != first[1]).then_some(fetched)
        },
    );
    let chain = openssl_verifies(&rotated, &root);
    assert_eq!(chain.len(), 2);
    let bundle = std::fs::read_to_string(rotated.join("bundle.0.pem")).unwrap();
    assert_eq!(
        der_certs(&bundle),
        [root.cert.to_vec()],
        "the bundle did not change"
    );
    assert_eq!(der_certs(&server.bundle_pem()), [root.cert.to_vec()]);
    client_fetch("go-spiffe", &agent.socket, &format!("spiffe://{TD}/web"), 2);
}

#[test]
fn memory_keys_with_an_upstream_survive_a_restart_for_agents() {
    let dir = scratch();
    let root = OutsideCa::new("Example Upstream Root", KeyType::EcP256, None);
    let config = server_config(dir.path(), &root, &[], "key_manager = \"memory\"");
    let bind = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_on(
        dir.path(),
        &bind,
        &[
            "--config",
            config.to_str().unwrap(),
            "--default-x509-svid-ttl",
            "5s",
        ],
    );
    let (token, agent_id) = server.token(&["--spiffe-id", &format!("spiffe://{TD}/node/a")]);
    let uid = own_uid_selector();
    server.create_entry(&format!("spiffe://{TD}/web"), &agent_id, &[&uid], &[]);
    let agent = Agent::start(&server, "agent-a", Some(&token));
    let first = openssl_verifies(&fetch_written(&agent.socket, dir.path()), &root);

    let written: Vec<String> = std::fs::read_dir(&server.data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !written.iter().any(|n| n == "ca" || n.ends_with(".pem")),
        "no authority file in the data directory: {written:?}"
    );

    // A restart starts a new intermediate under the same root: the agent
    // keeps its SVID and the workload gets SVIDs of the new one.
    server.restart();
    assert!(
        server
            .log()
            .contains("key_manager is `memory`: the previous run's authority keys are gone"),
        "{}",
        server.log()
    );
    let rotated = eventually(
        "an SVID signed by the new intermediate",
        Duration::from_secs(30),
        || {
            let fetched = fetch_written(&agent.socket, dir.path());
            let chain = der_certs(&std::fs::read_to_string(fetched.join("svid.0.pem")).unwrap());
            (chain[1] != first[1]).then_some(fetched)
        },
    );
    openssl_verifies(&rotated, &root);
    assert_eq!(der_certs(&server.bundle_pem()), [root.cert.to_vec()]);
}
