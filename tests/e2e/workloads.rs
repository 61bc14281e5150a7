//! Workloads under different uids get different identities; a uid with no
//! entry gets PERMISSION_DENIED `no identity issued`.

use crate::support::*;

#[test]
fn each_uid_gets_its_own_identity_and_others_none() {
    if !is_root() {
        eprintln!("skipped: running workloads as other uids needs root");
        return;
    }
    let domain = Domain::start(&[
        ("/billing", &["unix:uid:1001"], &[]),
        ("/frontend", &["unix:uid:1002"], &[]),
    ]);

    let billing = domain.agent.fetch(Some(1001), None);
    assert!(billing.status.success(), "{}", stderr(&billing));
    let frontend = domain.agent.fetch(Some(1002), None);
    assert!(frontend.status.success(), "{}", stderr(&frontend));

    assert!(stdout(&billing).contains("spiffe://example.org/billing"));
    assert!(!stdout(&billing).contains("spiffe://example.org/frontend"));
    assert!(stdout(&frontend).contains("spiffe://example.org/frontend"));
    assert!(!stdout(&frontend).contains("spiffe://example.org/billing"));

    let nobody = domain.agent.fetch(Some(1003), None);
    assert_eq!(nobody.status.code(), Some(1));
    let err = stderr(&nobody).to_lowercase();
    assert!(
        err.contains("permission denied") || err.contains("permissiondenied"),
        "{err}"
    );
    assert!(err.contains("no identity issued"), "{err}");
}

#[test]
fn selectors_must_all_match() {
    if !is_root() {
        eprintln!("skipped: running workloads as other uids needs root");
        return;
    }
    // uid 1001 with gid 1001 matches; an entry also requiring gid 0 does not.
    let domain = Domain::start(&[
        ("/both", &["unix:uid:1001", "unix:gid:1001"], &[]),
        ("/wrong-gid", &["unix:uid:1001", "unix:gid:0"], &[]),
    ]);
    let out = domain.agent.fetch(Some(1001), None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("spiffe://example.org/both"));
    assert!(!stdout(&out).contains("spiffe://example.org/wrong-gid"));
}
