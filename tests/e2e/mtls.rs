//! Two workloads set up mutual TLS with nothing but what the agent gave
//! them (go-spiffe's spiffetls), and each sees the other's SPIFFE ID.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::*;

#[test]
fn two_workloads_authenticate_each_other() {
    if !is_root() {
        eprintln!("skipped: running workloads as other uids needs root");
        return;
    }
    let go = crate::interop::go_client();
    let domain = Domain::start(&[
        ("/server-side", &["unix:uid:1001"], &[]),
        ("/client-side", &["unix:uid:1002"], &[]),
    ]);
    let go = copy_for_others(&go, domain.dir.path());

    let mut serve = Command::new(&go);
    serve
        .args(["serve", "--addr", "127.0.0.1:0", "--rounds", "1"])
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    as_uid(&mut serve, Some(1001));
    let mut serve = spawn(&mut serve);
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let listening: serde_json::Value =
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let addr = listening["listening"].as_str().unwrap().to_owned();

    let mut dial = Command::new(&go);
    dial.args(["dial", "--addr", &addr])
        .env("SPIFFE_ENDPOINT_SOCKET", domain.agent.endpoint());
    as_uid(&mut dial, Some(1002));
    let dial = output_of(&mut dial);
    assert!(dial.status.success(), "dial: {}", stderr(&dial));
    let client_view: serde_json::Value =
        serde_json::from_str(stdout(&dial).lines().next().unwrap()).unwrap();
    assert_eq!(client_view["self"], "spiffe://example.org/client-side");
    assert_eq!(client_view["peer"], "spiffe://example.org/server-side");

    let server_view: serde_json::Value =
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(server_view["self"], "spiffe://example.org/server-side");
    assert_eq!(server_view["peer"], "spiffe://example.org/client-side");
    assert!(serve.wait().unwrap().success());
}
