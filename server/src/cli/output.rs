//! How admin commands print entries: SPIRE-like text blocks, or JSON.

use std::fmt::Write;

use sigil::proto::sigil::admin::v1::EntryResult;
use sigil::proto::sigil::types::v1 as pb;

use crate::clock;

/// One entry as a text block (no trailing blank line).
pub(crate) fn entry_text(e: &pb::Entry) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &dyn std::fmt::Display| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{label:<17}: {value}");
    };
    line("Entry ID", &e.id);
    line("SPIFFE ID", &e.spiffe_id);
    line("Parent ID", &e.parent_id);
    line("Revision", &e.revision);
    if e.x509_svid_ttl == 0 {
        line("X509-SVID TTL", &"default");
    } else {
        line("X509-SVID TTL", &e.x509_svid_ttl);
    }
    if e.jwt_svid_ttl == 0 {
        line("JWT-SVID TTL", &"default");
    } else {
        line("JWT-SVID TTL", &e.jwt_svid_ttl);
    }
    if e.expires_at != 0 {
        line("Entry expiry", &clock::rfc3339(e.expires_at));
    }
    for s in &e.selectors {
        line("Selector", &format!("{}:{}", s.r#type, s.value));
    }
    for name in &e.dns_names {
        line("DNS name", name);
    }
    for td in &e.federates_with {
        line("Federates with", td);
    }
    if e.admin {
        line("Admin", &true);
    }
    if e.downstream {
        line("Downstream", &true);
    }
    if !e.hint.is_empty() {
        line("Hint", &e.hint);
    }
    out
}

/// Entries as text blocks separated by blank lines.
pub(crate) fn entries_text(entries: &[pb::Entry]) -> String {
    entries
        .iter()
        .map(entry_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `Found N entries` header.
pub(crate) fn found(n: usize) -> String {
    if n == 1 {
        "Found 1 entry".into()
    } else {
        format!("Found {n} entries")
    }
}

/// One entry as a JSON object.
pub(crate) fn entry_json(e: &pb::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "revision": e.revision,
        "created_at": e.created_at,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "downstream": e.downstream,
        "expires_at": e.expires_at,
    })
}

/// Entries as a pretty JSON array.
pub(crate) fn entries_json(entries: &[pb::Entry]) -> String {
    let values: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
    serde_json::to_string_pretty(&values).unwrap_or_else(|_| "[]".into())
}

/// One status line per item of a batch: `entries[0]: created entry ID
/// (SPIFFE ID)` on success, `error: MESSAGE` on failure (the server's
/// message names the item and field).
pub(crate) fn results_text(results: &[EntryResult], item: &str, action: &str) -> String {
    let mut out = String::new();
    for (i, result) in results.iter().enumerate() {
        // Writing to a String cannot fail.
        let _ = match (&result.status, &result.entry) {
            (Some(status), _) if status.code != 0 => writeln!(out, "error: {}", status.message),
            (_, Some(e)) => writeln!(
                out,
                "{item}[{i}]: {action} entry {} ({})",
                e.id, e.spiffe_id
            ),
            (_, None) => writeln!(out, "{item}[{i}]: {action}"),
        };
    }
    out
}

/// The items of a batch as JSON: `{"results": [{"code", "message",
/// "entry"}]}`, `entry` being null on failure.
pub(crate) fn results_json(results: &[EntryResult]) -> String {
    let results: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let (code, message) = r
                .status
                .as_ref()
                .map_or((0, ""), |s| (s.code, s.message.as_str()));
            serde_json::json!({
                "code": code,
                "message": message,
                "entry": r.entry.as_ref().map(entry_json),
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({ "results": results }))
        .unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> pb::Entry {
        pb::Entry {
            id: "6b0a".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            x509_svid_ttl: 3600,
            dns_names: vec!["web.example.org".into()],
            hint: "internal".into(),
            revision: 3,
            created_at: 1_700_000_000,
            jwt_svid_ttl: 300,
            federates_with: vec!["partner.org".into()],
            admin: true,
            downstream: false,
            expires_at: 1_893_456_000,
        }
    }

    #[test]
    fn text_blocks_are_aligned_and_skip_empty_fields() {
        assert_eq!(
            entry_text(&entry()),
            "Entry ID         : 6b0a\n\
             SPIFFE ID        : spiffe://example.org/web\n\
             Parent ID        : spiffe://example.org/agent\n\
             Revision         : 3\n\
             X509-SVID TTL    : 3600\n\
             JWT-SVID TTL     : 300\n\
             Entry expiry     : 2030-01-01T00:00:00Z\n\
             Selector         : unix:uid:1000\n\
             DNS name         : web.example.org\n\
             Federates with   : partner.org\n\
             Admin            : true\n\
             Hint             : internal\n"
        );
        let mut bare = entry();
        bare.x509_svid_ttl = 0;
        bare.jwt_svid_ttl = 0;
        bare.expires_at = 0;
        bare.dns_names.clear();
        bare.federates_with.clear();
        bare.admin = false;
        bare.hint.clear();
        let text = entry_text(&bare);
        assert!(text.contains("X509-SVID TTL    : default\n"));
        assert!(text.contains("JWT-SVID TTL     : default\n"));
        for absent in [
            "DNS name",
            "Hint",
            "Entry expiry",
            "Federates",
            "Admin",
            "Downstream",
        ] {
            assert!(!text.contains(absent), "{absent}");
        }
        assert_eq!(
            entries_text(&[entry(), bare])
                .matches("\n\nEntry ID")
                .count(),
            1
        );
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&entries_json(&[entry()])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{
                "id": "6b0a",
                "spiffe_id": "spiffe://example.org/web",
                "parent_id": "spiffe://example.org/agent",
                "selectors": ["unix:uid:1000"],
                "x509_svid_ttl": 3600,
                "dns_names": ["web.example.org"],
                "hint": "internal",
                "revision": 3,
                "created_at": 1_700_000_000,
                "jwt_svid_ttl": 300,
                "federates_with": ["partner.org"],
                "admin": true,
                "downstream": false,
                "expires_at": 1_893_456_000,
            }])
        );
        assert_eq!(entries_json(&[]), "[]");
    }

    fn results() -> Vec<EntryResult> {
        vec![
            EntryResult {
                status: Some(pb::ItemStatus {
                    code: 0,
                    message: String::new(),
                }),
                entry: Some(entry()),
            },
            EntryResult {
                status: Some(pb::ItemStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: "entries[1].parent_id: is required".into(),
                }),
                entry: None,
            },
        ]
    }

    #[test]
    fn batch_results_have_one_line_per_item() {
        assert_eq!(
            results_text(&results(), "entries", "created"),
            "entries[0]: created entry 6b0a (spiffe://example.org/web)\n\
             error: entries[1].parent_id: is required\n"
        );
        let v: serde_json::Value = serde_json::from_str(&results_json(&results())).unwrap();
        assert_eq!(v["results"][0]["code"], 0);
        assert_eq!(v["results"][0]["entry"]["id"], "6b0a");
        assert_eq!(v["results"][1]["code"], 3);
        assert_eq!(
            v["results"][1]["message"],
            "entries[1].parent_id: is required"
        );
        assert!(v["results"][1]["entry"].is_null());
    }

    #[test]
    fn the_header_counts_entries() {
        assert_eq!(found(0), "Found 0 entries");
        assert_eq!(found(1), "Found 1 entry");
        assert_eq!(found(2), "Found 2 entries");
    }
}
