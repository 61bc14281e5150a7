//! The README's first command, `deploy/quickstart.sh`, brings up a trust
//! domain and shows an SVID for the invoking user, verified by openssl.

use std::process::Command;

use crate::support::*;

#[test]
fn quickstart_issues_an_svid_to_the_invoking_user() {
    let dir = scratch();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/quickstart.sh"))
        .arg("--once")
        .env("SIGIL_BIN_DIR", bin_dir())
        .env("SIGIL_QUICKSTART_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));

    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name;
    let expected = format!("spiffe://example.org/user/{user}");
    let printed = stdout(&out);
    assert!(
        printed.contains(&format!("SPIFFE ID:\t\t{expected}")),
        "{printed}"
    );
    assert!(
        printed.contains("svid.0.pem: OK"),
        "openssl verify must pass: {printed}"
    );
    assert!(printed.contains(&format!("URI:{expected}")), "{printed}");
}
