//! Two complete rotations of the signing authority, with a 2-minute CA
//! lifetime and 20 s SVIDs, under live traffic: the second authority is
//! published at 60 s and signs from 100 s, the third is published at 120 s
//! and signs from 160 s.
//!
//! Throughout, two workloads under other uids (go-spiffe `serve` and
//! `redial`) set up a new mutual-TLS connection every 200 ms, and not one
//! handshake may fail; the connections go on while each side's SVID moves
//! from the first authority to the second and then to the third. At the
//! same time a go-spiffe and a py-spiffe watcher (and a Rust `spiffe`
//! stream in this process) follow the rotation: each receives the bundle
//! with the new authority before the first SVID that authority signed, and
//! ends with an SVID of the third authority.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::support::*;

/// The longest the whole rotation may take to reach SVIDs of the third
/// authority (due at about 170 s).
const ROTATION_DEADLINE: Duration = Duration::from_secs(260);

/// The longest pause between two successful handshakes (one every 200 ms;
/// a handshake waits for nothing but the two processes).
const MAX_HANDSHAKE_GAP: Duration = Duration::from_secs(5);

/// One update the in-process stream received: the SVID's serial and
/// signing authority, and the bundle's authorities (indices into the
/// authorities in the order they first appeared).
#[derive(Debug, Clone)]
struct Update {
    serial: String,
    signer: usize,
    bundle: Vec<usize>,
}

/// What the in-process stream learnt so far.
#[derive(Debug, Default)]
struct Seen {
    /// Authorities, in the order they first appeared in a bundle.
    authorities: Vec<CertificateDer<'static>>,
    updates: Vec<Update>,
}

impl Seen {
    fn index_of(&mut self, ca: &CertificateDer<'static>) -> usize {
        match self.authorities.iter().position(|a| a == ca) {
            Some(i) => i,
            None => {
                self.authorities.push(ca.clone());
                self.authorities.len() - 1
            }
        }
    }

    /// The authority (index) whose SHA-256 is `hex`.
    fn by_digest(&self, hex: &str) -> Option<usize> {
        self.authorities.iter().position(|ca| sha256_hex(ca) == hex)
    }

    /// The updates carrying the SVID `serial`, in order.
    fn run_of(&self, serial: &str) -> Vec<&Update> {
        self.updates.iter().filter(|u| u.serial == serial).collect()
    }
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A certificate's serial number as the interop programs print it:
/// lowercase hex without leading zeros.
fn serial_hex(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_owned()
}

/// Whether `chain` (leaf first) verifies to `authority` for client and
/// server authentication.
fn signed_by(chain: &[CertificateDer<'_>], authority: &CertificateDer<'_>) -> bool {
    let anchors = [webpki::anchor_from_trusted_cert(authority)
        .unwrap()
        .to_owned()];
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ]
    .into_iter()
    .all(|usage| {
        leaf.verify_for_usage(
            algs,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .is_ok()
    })
}

/// The lines a child process prints on one of its outputs, read on a
/// thread of their own.
struct Lines {
    name: &'static str,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn of(name: &'static str, output: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { name, rx }
    }

    /// The next line, or `None` at end of output; panics at `deadline`.
    fn next_before(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("{}: no line in time", self.name),
        }
    }

    /// Every line left, until the output ends.
    fn rest(&self) -> Vec<String> {
        self.rx.iter().collect()
    }
}

/// A workload process with its stdout (and, when piped, stderr) read line
/// by line; killed when dropped.
struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Option<Lines>,
}

impl Workload {
    fn spawn(name: &'static str, cmd: &mut Command) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(cmd);
        let stdin = child.stdin.take();
        let stdout = Lines::of(name, child.stdout.take().unwrap());
        let stderr = Some(Lines::of(name, child.stderr.take().unwrap()));
        Self {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// The next line of stdout as JSON; panics, with what the process wrote
    /// on stderr, when stdout ends, and at `deadline`.
    fn json_before(&mut self, deadline: Instant) -> serde_json::Value {
        let Some(line) = self.stdout.next_before(deadline) else {
            let _ = self.child.wait();
            let errors = self.stderr.take().map(|l| l.rest()).unwrap_or_default();
            panic!("{}: output ended: {errors:?}", self.stdout.name);
        };
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{}: {e}: {line}", self.stdout.name))
    }

    /// Stops the process and returns what it wrote on stderr.
    fn kill(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().map(|l| l.rest()).unwrap_or_default()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A watcher's updates: the serial of each update's SVID and when it came.
fn watcher_serials(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["serial"].as_str().unwrap().to_owned())
        .collect()
}

/// Checks what a watcher printed against what the in-process stream saw:
/// every SVID is known, the bundle holding authority `n` reached the
/// watcher before the first SVID signed by `n` (n = 1, 2), and the last
/// SVID is signed by the third authority.
///
/// The watchers print SVIDs, not bundles; an update whose SVID did not
/// change carries a new bundle. The k-th update a watcher got with SVID
/// `s` carried the k-th bundle the in-process stream got with `s` when both
/// got as many updates with `s` (streams of the same caller get the same
/// messages; only a stream that falls behind skips one).
fn check_watcher(name: &str, serials: &[String], seen: &Seen) {
    let signer = |serial: &str| {
        seen.run_of(serial)
            .first()
            .unwrap_or_else(|| panic!("{name}: SVID {serial} never reached the Rust stream"))
            .signer
    };
    // The bundle of each update, when known.
    let mut bundles: Vec<Option<Vec<usize>>> = Vec::new();
    let mut i = 0;
    while i < serials.len() {
        let serial = &serials[i];
        let len = serials[i..].iter().take_while(|s| *s == serial).count();
        let run = seen.run_of(serial);
        for k in 0..len {
            let bundle = if run.len() == len {
                Some(run[k].bundle.clone())
            } else if run.iter().all(|u| u.bundle == run[0].bundle) {
                Some(run[0].bundle.clone())
            } else {
                None
            };
            bundles.push(bundle);
        }
        i += len;
    }
    for n in 1..=2 {
        let first = serials
            .iter()
            .position(|s| signer(s) == n)
            .unwrap_or_else(|| panic!("{name}: no SVID of authority {n}: {serials:?}"));
        assert!(
            bundles[..first]
                .iter()
                .flatten()
                .any(|b| b.len() == 2 && b.contains(&n)),
            "{name}: the bundle with authority {n} did not come before its first SVID \
             (update {first} of {serials:?}, bundles {bundles:?})"
        );
    }
    let last = serials.last().unwrap();
    assert_eq!(
        signer(last),
        2,
        "{name}: the last SVID is not from the third authority"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_and_watchers_live_through_two_ca_rotations() {
    if !is_root() {
        eprintln!("skipped: running workloads as other uids needs root");
        return;
    }
    let go = crate::interop::go_client();
    let python = crate::interop::python_client();

    let dir = scratch();
    let server = Server::start_with(
        dir.path(),
        &["--ca-ttl", "2m", "--default-x509-svid-ttl", "20s"],
    );
    let deadline = Instant::now() + ROTATION_DEADLINE;
    let (token, agent_id) = server.token(&["--spiffe-id", "spiffe://example.org/node/a"]);
    server.create_entry(
        "spiffe://example.org/server-side",
        &agent_id,
        &["unix:uid:1001"],
        &[],
    );
    server.create_entry(
        "spiffe://example.org/client-side",
        &agent_id,
        &["unix:uid:1002"],
        &[],
    );
    let own_uid = own_uid_selector();
    server.create_entry("spiffe://example.org/watcher", &agent_id, &[&own_uid], &[]);
    let agent = Agent::start(&server, "agent-a", Some(&token));
    let go_for_others = copy_for_others(&go, dir.path());
    let endpoint = agent.endpoint();

    // The in-process stream records every update, as the reference.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (third_tx, mut third_rx) = tokio::sync::watch::channel(false);
    let client = spiffe::WorkloadApiClient::connect_to(endpoint.clone())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let recorder = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let td = spiffe::TrustDomain::new("example.org").unwrap();
            while let Some(context) = stream.next().await {
                let context = context.unwrap();
                let svid = context.default_svid().unwrap();
                assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/watcher");
                let chain: Vec<CertificateDer<'static>> = svid
                    .cert_chain()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_ref().to_vec()))
                    .collect();
                let authorities: Vec<CertificateDer<'static>> = context
                    .bundle_set()
                    .get(&td)
                    .unwrap()
                    .authorities()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_ref().to_vec()))
                    .collect();
                let mut seen = seen.lock().unwrap();
                let bundle: Vec<usize> = authorities.iter().map(|a| seen.index_of(a)).collect();
                let signer = bundle
                    .iter()
                    .copied()
                    .find(|i| signed_by(&chain, &seen.authorities[*i]))
                    .expect("an SVID that does not verify against the bundle sent with it");
                seen.updates.push(Update {
                    serial: serial_hex(&chain[0]),
                    signer,
                    bundle,
                });
                if signer == 2 {
                    third_tx.send_replace(true);
                }
            }
        })
    };

    // The watchers, as this process's uid (the same entry).
    let watch_args = ["watch", "--updates", "1000", "--timeout", "600"];
    let mut go_watch = Command::new(&go);
    go_watch
        .args(watch_args)
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint);
    let mut go_watch = Workload::spawn("go watch", &mut go_watch);
    let mut py_watch = Command::new("python3");
    py_watch
        .arg(&python)
        .args(watch_args)
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint);
    let mut py_watch = Workload::spawn("py watch", &mut py_watch);

    // The mTLS pair, as two other uids.
    let mut serve = Command::new(&go_for_others);
    serve
        .args(["serve", "--addr", "127.0.0.1:0"])
        .args(["--rounds", "1000000", "--timeout", "600"])
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint);
    as_uid(&mut serve, Some(1001));
    let mut serve = Workload::spawn("serve", &mut serve);
    let listening = serve.json_before(deadline);
    let addr = listening["listening"].as_str().unwrap().to_owned();
    // Each served connection is a line on serve's stdout, which its reader
    // thread keeps draining; only its stderr (refused connections) is
    // checked.
    let mut redial = Command::new(&go_for_others);
    redial
        .args(["redial", "--addr", &addr, "--interval-ms", "200"])
        .args(["--duration", "600"])
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint);
    as_uid(&mut redial, Some(1002));
    let mut redial = Workload::spawn("redial", &mut redial);

    // Wait for the third authority's first SVID on the in-process stream.
    let reached = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        third_rx.wait_for(|third| *third),
    )
    .await
    .map(|r| r.is_ok());
    match reached {
        Ok(true) => {}
        Ok(false) => {
            // The recorder stopped: show why.
            recorder.await.unwrap();
            panic!("the Rust stream ended");
        }
        Err(_) => panic!(
            "no SVID of the third authority in time: {:?}",
            seen.lock().unwrap().updates
        ),
    }

    // Each watcher reaches an SVID of the third authority.
    let mut watched = HashMap::new();
    for (name, watcher) in [("go-spiffe", &mut go_watch), ("py-spiffe", &mut py_watch)] {
        let mut lines = Vec::new();
        loop {
            let line = watcher.json_before(deadline);
            assert_eq!(line["spiffe_id"], "spiffe://example.org/watcher", "{name}");
            let serial = line["serial"].as_str().unwrap().to_owned();
            lines.push(line);
            let signer = seen
                .lock()
                .unwrap()
                .run_of(&serial)
                .first()
                .map(|u| u.signer);
            if signer == Some(2) {
                break;
            }
        }
        watched.insert(name, lines);
    }

    // The handshakes go on until both sides hold SVIDs of the third
    // authority.
    let mut rounds: Vec<serde_json::Value> = Vec::new();
    loop {
        let round = redial.json_before(deadline);
        assert_eq!(round["ok"], true, "handshake failed: {round}");
        let both_third = {
            let seen = seen.lock().unwrap();
            let ca = |key: &str| round[key].as_str().and_then(|h| seen.by_digest(h));
            ca("peer_ca") == Some(2) && ca("self_ca") == Some(2)
        };
        rounds.push(round);
        if both_third {
            break;
        }
    }
    // Closing stdin ends the run: a summary line, and success only if no
    // round failed.
    drop(redial.stdin.take());
    let mut summary = None;
    while let Some(line) = redial.stdout.next_before(deadline) {
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        if value.get("summary").is_some() {
            summary = Some(value);
        } else {
            assert_eq!(value["ok"], true, "handshake failed: {value}");
            rounds.push(value);
        }
    }
    let status = redial.child.wait().unwrap();
    let redial_errors = redial.stderr.take().unwrap().rest();
    assert!(status.success(), "redial: {redial_errors:?}");
    let summary = summary.expect("redial printed no summary");
    assert_eq!(summary["summary"]["failed"], 0, "{summary}");
    assert_eq!(
        summary["summary"]["rounds"].as_u64().unwrap(),
        rounds.len() as u64
    );

    let serve_errors = serve.kill();
    assert!(
        serve_errors.is_empty(),
        "the server side refused connections: {serve_errors:?}"
    );
    let _ = go_watch.kill();
    let _ = py_watch.kill();
    recorder.abort();

    // The reference stream: the new authority's bundle came first.
    let seen = seen.lock().unwrap();
    assert!(seen.authorities.len() >= 3, "{:?}", seen.updates);
    for n in 1..=2 {
        let first = seen
            .updates
            .iter()
            .position(|u| u.signer == n)
            .unwrap_or_else(|| panic!("no SVID of authority {n}"));
        assert!(
            seen.updates[..first]
                .iter()
                .any(|u| u.bundle.len() == 2 && u.bundle.contains(&n)),
            "the Rust stream got an SVID of authority {n} before its bundle: {:?}",
            seen.updates
        );
    }
    assert!(seen.updates.iter().all(|u| u.bundle.len() <= 2));
    for (name, lines) in &watched {
        let serials = watcher_serials(lines);
        check_watcher(name, &serials, &seen);
        let signers: Vec<usize> = serials
            .iter()
            .map(|s| seen.run_of(s)[0].signer + 1)
            .collect();
        eprintln!(
            "{name}: {} updates, SVIDs of authorities {signers:?}",
            serials.len()
        );
    }
    let mut timeline: Vec<(String, usize)> = Vec::new();
    for u in &seen.updates {
        let bundle: Vec<usize> = u.bundle.iter().map(|i| i + 1).collect();
        let step = format!("SVID of {} with bundle {bundle:?}", u.signer + 1);
        match timeline.last_mut() {
            Some((last, n)) if *last == step => *n += 1,
            _ => timeline.push((step, 1)),
        }
    }
    eprintln!("Rust stream (updates): {timeline:?}");

    // The handshakes covered both activations on both sides, without a
    // pause.
    let signers = |key: &str| -> Vec<usize> {
        let mut v: Vec<usize> = rounds
            .iter()
            .map(|r| seen.by_digest(r[key].as_str().unwrap()).unwrap())
            .collect();
        v.dedup();
        v
    };
    assert_eq!(signers("peer_ca"), [0, 1, 2], "server side's SVIDs");
    assert_eq!(signers("self_ca"), [0, 1, 2], "client side's SVIDs");
    for pair in rounds.windows(2) {
        let gap = pair[1]["at"].as_i64().unwrap() - pair[0]["at"].as_i64().unwrap();
        assert!(
            gap < MAX_HANDSHAKE_GAP.as_millis() as i64,
            "{gap} ms between two handshakes: {} / {}",
            pair[0],
            pair[1]
        );
    }
    for pair in rounds.windows(2) {
        assert_eq!(
            pair[1]["round"].as_i64().unwrap(),
            pair[0]["round"].as_i64().unwrap() + 1
        );
    }
    eprintln!(
        "{} handshakes, none failed, over {} ms",
        rounds.len(),
        rounds.last().unwrap()["at"].as_i64().unwrap() - rounds[0]["at"].as_i64().unwrap()
    );

    // The first authority's activation at startup, then two rotations.
    let log = server.log();
    assert!(
        log.matches("prepared the next signing authority").count() >= 2,
        "{log}"
    );
    assert!(
        log.matches("activated a new signing authority").count() >= 3,
        "{log}"
    );
}
