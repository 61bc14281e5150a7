//! Registration entries through the real CLI: every field, idempotent
//! creation, batches from a data file with per-entry outcomes, filters and
//! pagination over thousands of entries, and expiry taking effect on a
//! running agent.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::support::*;

const PARENT: &str = "spiffe://example.org/sigil/agent/p1";
const OTHER_PARENT: &str = "spiffe://example.org/sigil/agent/p2";

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

/// Runs a command that must fail with `code`; returns its stderr.
fn fails(server: &Server, args: &[&str], code: i32) -> String {
    let out = server.cli(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: stdout {} stderr {}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

fn count(server: &Server, filters: &[&str]) -> u64 {
    let mut args = vec!["entry", "count", "--output", "json"];
    args.extend_from_slice(filters);
    let v: serde_json::Value = serde_json::from_str(&server.cli_ok(&args)).unwrap();
    v["count"].as_u64().unwrap()
}

fn write_data(dir: &Path, name: &str, entries: &[serde_json::Value]) -> String {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(&serde_json::json!({ "entries": entries })).unwrap();
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn every_field_is_stored_and_shown() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let created = server.create_entry(
        "spiffe://example.org/web",
        PARENT,
        &["unix:uid:1000"],
        &[
            "--entry-id",
            "web-1",
            "--x509-svid-ttl",
            "600",
            "--jwt-svid-ttl",
            "300",
            "--federates-with",
            "partner.org",
            "--federates-with",
            "bank.example",
            "--admin",
            "--downstream",
            "--entry-expiry",
            "2030-01-01T00:00:00Z",
            "--hint",
            "front",
        ],
    );
    assert_eq!(created["id"], "web-1");
    assert_eq!(created["x509_svid_ttl"], 600);
    assert_eq!(created["jwt_svid_ttl"], 300);
    assert_eq!(
        created["federates_with"],
        serde_json::json!(["bank.example", "partner.org"])
    );
    assert_eq!(created["admin"], true);
    assert_eq!(created["downstream"], true);
    assert_eq!(created["expires_at"], 1_893_456_000);

    let text = server.cli_ok(&["entry", "show", "--entry-id", "web-1"]);
    for line in [
        "Found 1 entry\n",
        "Entry ID         : web-1\n",
        "JWT-SVID TTL     : 300\n",
        "Entry expiry     : 2030-01-01T00:00:00Z\n",
        "Federates with   : bank.example\n",
        "Federates with   : partner.org\n",
        "Admin            : true\n",
        "Downstream       : true\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }

    // Unix seconds are accepted too; an entry without the flags shows none.
    let plain = server.create_entry(
        "spiffe://example.org/db",
        PARENT,
        &["unix:uid:1001"],
        &["--entry-expiry", "1893456000"],
    );
    assert_eq!(plain["expires_at"], 1_893_456_000);
    assert_eq!(plain["admin"], false);
    assert_eq!(plain["jwt_svid_ttl"], 0);
    assert_eq!(plain["federates_with"], serde_json::json!([]));
    // The server chose a UUID.
    assert_eq!(plain["id"].as_str().unwrap().len(), 36);

    // update replaces the new fields as well.
    let out = server.cli_ok(&[
        "entry",
        "update",
        "--entry-id",
        "web-1",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1000",
        "--output",
        "json",
    ]);
    let updated: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(updated[0]["admin"], false);
    assert_eq!(updated[0]["expires_at"], 0);
    assert_eq!(updated[0]["federates_with"], serde_json::json!([]));
    assert!(updated[0]["revision"].as_u64() > created["revision"].as_u64());
}

#[test]
fn creating_an_existing_id_is_refused_and_stores_nothing() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let args = [
        "entry",
        "create",
        "--entry-id",
        "web-1",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1000",
    ];
    server.cli_ok(&args);
    let err = fails(&server, &args, 1);
    assert_eq!(
        err,
        "Error: entries[0].id: entry \"web-1\" already exists\n"
    );

    // The same ID with other content is refused the same way.
    let mut other = args;
    other[5] = "spiffe://example.org/other";
    let err = fails(&server, &other, 1);
    assert_eq!(
        err,
        "Error: entries[0].id: entry \"web-1\" already exists\n"
    );
    assert_eq!(count(&server, &[]), 1);
}

/// `entry create` of a valid entry, with `extra` flags.
fn create<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1000",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn bad_field_flags_are_refused_with_the_flag_named() {
    let dir = scratch();
    let server = Server::start(dir.path());

    let err = fails(&server, &create(&["--entry-id", "a b"]), 1);
    assert_eq!(
        err,
        "Error: --entry-id \"a b\": only ASCII letters, digits, `-`, `_` and `.` are allowed\n"
    );
    let long = "x".repeat(256);
    let err = fails(&server, &create(&["--entry-id", &long]), 1);
    assert_eq!(
        err,
        format!("Error: --entry-id \"{long}\": must be 1 to 255 bytes\n")
    );

    let err = fails(&server, &create(&["--federates-with", "Partner.org"]), 1);
    assert!(
        err.starts_with("Error: --federates-with \"Partner.org\": trust domain has the character"),
        "{err}"
    );
    // A well-formed name that the server refuses: the entry's own domain.
    let err = fails(&server, &create(&["--federates-with", "example.org"]), 1);
    assert_eq!(
        err,
        "Error: entries[0].federates_with[0]: \"example.org\" is the entry's own trust domain\n"
    );

    let err = fails(&server, &create(&["--entry-expiry", "tomorrow"]), 2);
    assert!(
        err.contains("invalid value 'tomorrow' for '--entry-expiry <TIME>'"),
        "{err}"
    );
    assert!(err.contains("\"tomorrow\" is not a time"), "{err}");
    let err = fails(&server, &create(&["--jwt-svid-ttl=-1"]), 2);
    assert!(
        err.contains("invalid value '-1' for '--jwt-svid-ttl <SECONDS>'"),
        "{err}"
    );
    let err = fails(&server, &create(&["--jwt-svid-ttl", "2592001"]), 1);
    assert_eq!(
        err,
        "Error: entries[0].jwt_svid_ttl: must be at most 2592000 seconds\n"
    );

    // --data conflicts with the field flags.
    let err = fails(
        &server,
        &["entry", "create", "--data", "x.json", "--admin"],
        2,
    );
    assert!(
        err.contains("the argument '--data <FILE>' cannot be used with"),
        "{err}"
    );

    assert_eq!(count(&server, &[]), 0);
}

/// Updates and deletions of unknown entries, and `--data` beside
/// `--entry-id`, are refused with the ID or flag named, and change nothing.
#[test]
fn unknown_ids_and_conflicting_flags_change_nothing() {
    let dir = scratch();
    let server = Server::start(dir.path());
    server.create_entry(
        "spiffe://example.org/web",
        "spiffe://example.org/node/a",
        &["unix:uid:1001"],
        &[],
    );
    let before = server.cli_ok(&["entry", "show", "--output", "json"]);

    let err = fails(
        &server,
        &[
            "entry",
            "update",
            "--entry-id",
            "no-such-entry",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            "spiffe://example.org/node/a",
            "--selector",
            "unix:uid:1002",
        ],
        1,
    );
    assert_eq!(err, "Error: entries[0].id: no entry \"no-such-entry\"\n");
    let err = fails(
        &server,
        &["entry", "delete", "--entry-id", "no-such-entry"],
        1,
    );
    assert_eq!(err, "Error: ids[0]: no entry \"no-such-entry\"\n");
    for verb in ["update", "delete"] {
        let err = fails(
            &server,
            &["entry", verb, "--data", "x.json", "--entry-id", "abc"],
            2,
        );
        assert!(
            err.contains("the argument '--data <FILE>' cannot be used with"),
            "{verb}: {err}"
        );
    }
    let err = fails(&server, &["entry", "show", "--selector", "unix"], 1);
    assert_eq!(err, "Error: --selector \"unix\": must be `type:value`\n");
    let err = fails(
        &server,
        &["entry", "show", "--entry-id", "no-such-entry"],
        1,
    );
    assert_eq!(err, "Error: no entry \"no-such-entry\"\n");

    assert_eq!(
        server.cli_ok(&["entry", "show", "--output", "json"]),
        before
    );
}

#[test]
fn a_data_file_batch_answers_each_entry_and_keeps_the_good_ones() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let data = write_data(
        dir.path(),
        "batch.json",
        &[
            serde_json::json!({
                "id": "a",
                "spiffe_id": "spiffe://example.org/a",
                "parent_id": PARENT,
                "selectors": ["unix:uid:1"],
                "federates_with": ["partner.org"],
                "expires_at": "2030-01-01T00:00:00Z",
            }),
            serde_json::json!({
                "spiffe_id": "spiffe://example.org/b//bad",
                "parent_id": PARENT,
                "selectors": ["unix:uid:2"],
            }),
            serde_json::json!({
                "id": "c",
                "spiffe_id": "spiffe://example.org/c",
                "parent_id": PARENT,
                "selectors": ["unix:uid:3"],
                "jwt_svid_ttl": 60,
            }),
            serde_json::json!({
                "spiffe_id": "spiffe://example.org/d",
                "parent_id": PARENT,
                "selectors": ["unix"],
            }),
        ],
    );

    let out = server.cli(&["entry", "create", "--data", &data]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "entries[0]: created entry a (spiffe://example.org/a)\n\
         error: entries[1].spiffe_id: \"spiffe://example.org/b//bad\" path has an empty segment or a trailing `/`\n\
         entries[2]: created entry c (spiffe://example.org/c)\n\
         error: entries[3].selectors[0]: value is empty\n"
    );
    assert_eq!(stderr(&out), "Error: 2 of 4 entries failed\n");
    assert_eq!(count(&server, &[]), 2);
    assert_eq!(count(&server, &["--federates-with", "partner.org"]), 1);

    // The same file again: the entries with IDs exist already.
    let out = server.cli(&["entry", "create", "--data", &data, "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["results"][0]["code"], 6, "ALREADY_EXISTS");
    assert_eq!(
        v["results"][0]["message"],
        "entries[0].id: entry \"a\" already exists"
    );
    assert!(v["results"][0]["entry"].is_null());
    assert_eq!(count(&server, &[]), 2);

    // What `show` prints can be fed back to `update`.
    let shown = server.cli_ok(&["entry", "show", "--entry-id", "c", "--output", "json"]);
    let mut entries: Vec<serde_json::Value> = serde_json::from_str(&shown).unwrap();
    entries[0]["hint"] = "edited".into();
    entries.push(serde_json::json!({
        "id": "missing",
        "spiffe_id": "spiffe://example.org/x",
        "parent_id": PARENT,
        "selectors": ["unix:uid:9"],
    }));
    let update = write_data(dir.path(), "update.json", &entries);
    let out = server.cli(&["entry", "update", "--data", &update]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        "entries[0]: updated entry c (spiffe://example.org/c)\n\
         error: entries[1].id: no entry \"missing\"\n"
    );
    assert_eq!(count(&server, &["--hint", "edited"]), 1);

    let delete = write_data(
        dir.path(),
        "delete.json",
        &[
            serde_json::json!({"id": "a"}),
            serde_json::json!({"id": "nope"}),
        ],
    );
    let out = server.cli(&["entry", "delete", "--data", &delete]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        "ids[0]: deleted entry a (spiffe://example.org/a)\nerror: ids[1]: no entry \"nope\"\n"
    );
    assert_eq!(count(&server, &[]), 1);
}

#[test]
fn an_unreadable_or_malformed_data_file_creates_nothing() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let missing = dir.path().join("missing.json");
    let missing = missing.to_str().unwrap();
    let err = fails(&server, &["entry", "create", "--data", missing], 1);
    assert_eq!(
        err,
        format!("Error: cannot read data file {missing}: No such file or directory (os error 2)\n")
    );

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        "{\"entries\": [\n  {\"spiffe_id\": \"spiffe://example.org/a\", \"parent_id\": \"x\", \"selectors\": [\"unix:uid:1\"]},\n  {\"spiffe_id\": 5}\n]}\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let err = fails(&server, &["entry", "create", "--data", bad], 1);
    assert_eq!(
        err,
        format!(
            "Error: data file {bad}: invalid type: integer `5`, expected a string at line 3 column 17\n"
        )
    );

    let not_object = dir.path().join("list.json");
    std::fs::write(&not_object, "[]").unwrap();
    let not_object = not_object.to_str().unwrap();
    let err = fails(&server, &["entry", "create", "--data", not_object], 1);
    assert_eq!(
        err,
        format!("Error: data file {not_object}: must be a JSON object {{\"entries\": [...]}}\n")
    );
    assert_eq!(count(&server, &[]), 0);
}

/// Which of the generated entries a property holds for.
struct Generated {
    n: usize,
}

impl Generated {
    fn parent(&self, i: usize) -> &'static str {
        if i.is_multiple_of(2) {
            PARENT
        } else {
            OTHER_PARENT
        }
    }
    fn uid(i: usize) -> usize {
        i % 10
    }
    fn gid(i: usize) -> usize {
        i % 7
    }
    fn federates(i: usize) -> bool {
        i.is_multiple_of(4)
    }
    fn hint(i: usize) -> &'static str {
        if i.is_multiple_of(3) { "three" } else { "" }
    }
    fn entries(&self) -> Vec<serde_json::Value> {
        (0..self.n)
            .map(|i| {
                serde_json::json!({
                    "spiffe_id": format!("spiffe://example.org/svc/{i}"),
                    "parent_id": self.parent(i),
                    "selectors": [
                        format!("unix:uid:{}", Self::uid(i)),
                        format!("unix:gid:{}", Self::gid(i)),
                    ],
                    "federates_with": if Self::federates(i) { vec!["partner.org"] } else { vec![] },
                    "hint": Self::hint(i),
                })
            })
            .collect()
    }
    fn count(&self, f: impl Fn(usize) -> bool) -> u64 {
        (0..self.n).filter(|&i| f(i)).count() as u64
    }
}

#[test]
fn filters_and_pagination_over_two_thousand_entries() {
    let dir = scratch();
    let server = Server::start(dir.path());
    let g = Generated { n: 2000 };
    let data = write_data(dir.path(), "many.json", &g.entries());
    let out = server.cli(&["entry", "create", "--data", &data]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2000);
    assert!(!stdout(&out).contains("error:"));

    // `show` follows the pages (100 per page) to the end.
    let all = server.cli_ok(&["entry", "show", "--output", "json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&all).unwrap();
    assert_eq!(all.len(), 2000);
    let mut ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let sorted = {
        let mut s = ids.clone();
        s.sort();
        s
    };
    assert_eq!(ids, sorted, "entries come in ID order");
    ids.dedup();
    assert_eq!(ids.len(), 2000, "no entry is listed twice");
    assert_eq!(count(&server, &[]), 2000);
    let text = server.cli_ok(&["entry", "show"]);
    assert!(
        text.starts_with("Found 2000 entries\n\n"),
        "{}",
        &text[..80]
    );
    assert_eq!(server.cli_ok(&["entry", "count"]), "2000 entries\n");

    let cases: Vec<(Vec<&str>, u64)> = vec![
        (
            vec!["--parent-id", OTHER_PARENT],
            g.count(|i| !i.is_multiple_of(2)),
        ),
        (vec!["--spiffe-id", "spiffe://example.org/svc/77"], 1),
        (
            vec!["--hint", "three"],
            g.count(|i| Generated::hint(i) == "three"),
        ),
        (
            vec!["--federates-with", "partner.org"],
            g.count(Generated::federates),
        ),
        (
            vec!["--federates-with", "partner.org", "--parent-id", PARENT],
            g.count(|i| Generated::federates(i) && i.is_multiple_of(2)),
        ),
        // superset (the default): the entry has uid 3, and maybe more.
        (
            vec!["--selector", "unix:uid:3"],
            g.count(|i| Generated::uid(i) == 3),
        ),
        // exact: only entries with exactly these two.
        (
            vec![
                "--selector",
                "unix:uid:3",
                "--selector",
                "unix:gid:4",
                "--match",
                "exact",
            ],
            g.count(|i| Generated::uid(i) == 3 && Generated::gid(i) == 4),
        ),
        // One selector cannot be an exact match for two-selector entries.
        (vec!["--selector", "unix:uid:3", "--match", "exact"], 0),
        // subset: every selector of the entry is among the given ones.
        (
            vec![
                "--selector",
                "unix:uid:3",
                "--selector",
                "unix:gid:4",
                "--selector",
                "unix:gid:5",
                "--match",
                "subset",
            ],
            g.count(|i| Generated::uid(i) == 3 && [4, 5].contains(&Generated::gid(i))),
        ),
        // any: at least one in common.
        (
            vec![
                "--selector",
                "unix:uid:3",
                "--selector",
                "unix:gid:4",
                "--match",
                "any",
            ],
            g.count(|i| Generated::uid(i) == 3 || Generated::gid(i) == 4),
        ),
    ];
    for (filters, expected) in cases {
        assert!(expected > 0 || filters.contains(&"exact"), "{filters:?}");
        assert_eq!(count(&server, &filters), expected, "count {filters:?}");
        let mut args = vec!["entry", "show", "--output", "json"];
        args.extend_from_slice(&filters);
        let shown: Vec<serde_json::Value> = serde_json::from_str(&server.cli_ok(&args)).unwrap();
        assert_eq!(shown.len() as u64, expected, "show {filters:?}");
    }

    // An ID filter combines with the others.
    let first = all[0]["id"].as_str().unwrap();
    let parent = all[0]["parent_id"].as_str().unwrap();
    assert_eq!(
        count(&server, &["--entry-id", first, "--parent-id", parent]),
        1
    );
    let elsewhere = if parent == PARENT {
        OTHER_PARENT
    } else {
        PARENT
    };
    assert_eq!(
        server.cli_ok(&[
            "entry",
            "show",
            "--entry-id",
            first,
            "--parent-id",
            elsewhere
        ]),
        "Found 0 entries\n"
    );

    // Bad filters.
    let err = fails(&server, &["entry", "show", "--match", "any"], 2);
    assert!(err.contains("--selector <TYPE:VALUE>"), "{err}");
    let err = fails(&server, &["entry", "show", "--selector", "unix"], 1);
    assert_eq!(err, "Error: --selector \"unix\": must be `type:value`\n");
    let err = fails(&server, &["entry", "count", "--federates-with", "Bad!"], 1);
    assert!(
        err.starts_with("Error: --federates-with \"Bad!\": "),
        "{err}"
    );
    let err = fails(
        &server,
        &["entry", "show", "--entry-id", "no-such-entry"],
        1,
    );
    assert_eq!(err, "Error: no entry \"no-such-entry\"\n");
}

#[test]
fn an_expired_entry_loses_its_svid_on_a_running_agent() {
    let uid = own_uid_selector();
    // Long enough for the agent to start and serve both before the expiry,
    // even on a loaded machine.
    let expiry = now_unix() + 10;
    let expiry_flag = expiry.to_string();
    let domain = Domain::start(&[
        ("/short", &[uid.as_str()], &["--entry-expiry", &expiry_flag]),
        ("/long", &[uid.as_str()], &[]),
    ]);

    let before = eventually("both SVIDs served", Duration::from_secs(10), || {
        let out = domain.agent.fetch(None, None);
        let text = stdout(&out);
        (out.status.success()
            && text.contains("spiffe://example.org/short")
            && text.contains("spiffe://example.org/long"))
        .then_some(text)
    });
    assert!(
        now_unix() < expiry,
        "the agent took too long to start for this test: {before}"
    );

    // The server deletes the entry at its expiry; the agent drops the SVID.
    eventually("the expired SVID dropped", Duration::from_secs(15), || {
        let out = domain.agent.fetch(None, None);
        let text = stdout(&out);
        (out.status.success()
            && !text.contains("spiffe://example.org/short")
            && text.contains("spiffe://example.org/long"))
        .then_some(())
    });
    assert!(now_unix() >= expiry, "dropped before its expiry");

    assert_eq!(
        count(
            &domain.server,
            &["--spiffe-id", "spiffe://example.org/short"]
        ),
        0
    );
    assert_eq!(count(&domain.server, &[]), 1);
    assert!(
        domain.server.log().contains("expired entry deleted"),
        "{}",
        domain.server.log()
    );
}
