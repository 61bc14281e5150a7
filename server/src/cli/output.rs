//! How admin commands print entries: SPIRE-like text blocks, or JSON.

use std::fmt::Write;

use sigil::proto::sigil::types::v1 as pb;

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
    for s in &e.selectors {
        line("Selector", &format!("{}:{}", s.r#type, s.value));
    }
    for name in &e.dns_names {
        line("DNS name", name);
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
    })
}

/// Entries as a pretty JSON array.
pub(crate) fn entries_json(entries: &[pb::Entry]) -> String {
    let values: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
    serde_json::to_string_pretty(&values).unwrap_or_else(|_| "[]".into())
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
             Selector         : unix:uid:1000\n\
             DNS name         : web.example.org\n\
             Hint             : internal\n"
        );
        let mut bare = entry();
        bare.x509_svid_ttl = 0;
        bare.dns_names.clear();
        bare.hint.clear();
        let text = entry_text(&bare);
        assert!(text.contains("X509-SVID TTL    : default\n"));
        assert!(!text.contains("DNS name"));
        assert!(!text.contains("Hint"));
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
            }])
        );
        assert_eq!(entries_json(&[]), "[]");
    }

    #[test]
    fn the_header_counts_entries() {
        assert_eq!(found(0), "Found 0 entries");
        assert_eq!(found(1), "Found 1 entry");
        assert_eq!(found(2), "Found 2 entries");
    }
}
