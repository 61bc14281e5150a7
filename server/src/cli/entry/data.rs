//! The `--data FILE` of `entry create|update|delete`: a JSON object
//! `{"entries": [...]}` whose entries have the shape `--output json` prints,
//! so the output of `entry show` can be edited and fed back.
//!
//! Only the file's shape is checked here: a file that cannot be read or is
//! not such an object is refused as a whole, before the server is
//! contacted. The entries' contents are checked by the server, entry by
//! entry, so that one bad entry does not hold back the others.

use std::path::Path;

use serde::Deserialize;
use sigil::proto::sigil::types::v1 as pb;

use crate::clock;

/// The file: `{"entries": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    entries: Vec<EntryJson>,
}

/// One entry, as `--output json` prints it. Missing fields are empty, and
/// the server names the ones an entry needs.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct EntryJson {
    id: String,
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<String>,
    x509_svid_ttl: i32,
    jwt_svid_ttl: i32,
    dns_names: Vec<String>,
    hint: String,
    federates_with: Vec<String>,
    admin: bool,
    downstream: bool,
    expires_at: Expiry,
    /// Set by the server; accepted so that shown entries can be fed back.
    revision: serde::de::IgnoredAny,
    /// Set by the server; accepted so that shown entries can be fed back.
    created_at: serde::de::IgnoredAny,
}

/// `expires_at`: seconds since the Unix epoch (0: never), or RFC 3339.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Expiry {
    Seconds(i64),
    Rfc3339(String),
}

impl Default for Expiry {
    fn default() -> Self {
        Self::Seconds(0)
    }
}

/// Reads the entries of a data file, in the file's order.
pub(super) fn read(path: &Path) -> anyhow::Result<Vec<pb::Entry>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read data file {}: {e}", path.display()))?;
    // serde reads a struct from an array too; name the expected shape instead.
    if !text.trim_start().starts_with('{') {
        anyhow::bail!(
            "data file {}: must be a JSON object {{\"entries\": [...]}}",
            path.display()
        );
    }
    let file: DataFile = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("data file {}: {e}", path.display()))?;
    if file.entries.is_empty() {
        anyhow::bail!("data file {}: `entries` is empty", path.display());
    }

    file.entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            e.into_proto().map_err(|reason| {
                anyhow::anyhow!("data file {}: entries[{i}].{reason}", path.display())
            })
        })
        .collect()
}

/// Parses RFC 3339 in UTC, e.g. `2030-01-01T00:00:00Z`, into seconds since
/// the Unix epoch.
pub(super) fn parse_rfc3339(value: &str) -> Result<i64, String> {
    humantime::parse_rfc3339(value)
        .map(clock::to_unix)
        .map_err(|e| format!("{value:?} is not a time ({e})"))
}

// === impl EntryJson ===

impl EntryJson {
    /// The wire entry. Selectors are split at their first `:` and sent even
    /// when malformed, so the server reports them with the entry.
    fn into_proto(self) -> Result<pb::Entry, String> {
        let expires_at = match self.expires_at {
            Expiry::Seconds(n) => n,
            Expiry::Rfc3339(text) => {
                parse_rfc3339(&text).map_err(|e| format!("expires_at: {e}"))?
            }
        };
        let selectors = self
            .selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap_or((s, ""));
                pb::Selector {
                    r#type: kind.to_owned(),
                    value: value.to_owned(),
                }
            })
            .collect();

        Ok(pb::Entry {
            id: self.id,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            dns_names: self.dns_names,
            hint: self.hint,
            revision: 0,
            created_at: 0,
            jwt_svid_ttl: self.jwt_svid_ttl,
            federates_with: self.federates_with,
            admin: self.admin,
            downstream: self.downstream,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.json");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn entries_in_the_output_shape_are_read_in_order() {
        let (_dir, path) = write(
            r#"{"entries": [
                {"id": "web", "spiffe_id": "spiffe://example.org/web",
                 "parent_id": "spiffe://example.org/agent",
                 "selectors": ["unix:uid:1000", "unix:path:/a:b"],
                 "x509_svid_ttl": 60, "jwt_svid_ttl": 30, "dns_names": ["web"],
                 "hint": "h", "federates_with": ["partner.org"], "admin": true,
                 "downstream": true, "expires_at": "2030-01-01T00:00:00Z",
                 "revision": 7, "created_at": 1},
                {"spiffe_id": "spiffe://example.org/db", "selectors": ["bad"],
                 "expires_at": 1900000000}
            ]}"#,
        );
        let entries = read(&path).unwrap();
        assert_eq!(entries.len(), 2);
        let web = &entries[0];
        assert_eq!(web.id, "web");
        assert_eq!(web.selectors[1].r#type, "unix");
        assert_eq!(web.selectors[1].value, "path:/a:b");
        assert_eq!(web.jwt_svid_ttl, 30);
        assert_eq!(web.federates_with, ["partner.org"]);
        assert!(web.admin && web.downstream);
        assert_eq!(web.expires_at, 1_893_456_000);
        assert_eq!(web.revision, 0, "set by the server, not the file");

        let db = &entries[1];
        assert_eq!(db.parent_id, "", "left for the server to refuse");
        assert_eq!(db.selectors[0].r#type, "bad");
        assert_eq!(db.selectors[0].value, "");
        assert_eq!(db.expires_at, 1_900_000_000);
    }

    #[test]
    fn a_malformed_file_is_refused_with_its_name_and_position() {
        let (_dir, path) = write("{\"entries\": [\n  {\"spiffe_idd\": \"x\"}\n]}");
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "data file {}: unknown field `spiffe_idd`",
                path.display()
            )),
            "{err}"
        );
        assert!(err.ends_with("at line 2 column 15"), "{err}");

        let (_dir, path) = write("{\"entries\": [");
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.contains("EOF while parsing a list at line 1 column 13"),
            "{err}"
        );

        let (_dir, path) = write("[]");
        assert_eq!(
            read(&path).unwrap_err().to_string(),
            format!(
                "data file {}: must be a JSON object {{\"entries\": [...]}}",
                path.display()
            )
        );

        let (_dir, path) = write("{\"entries\": []}");
        assert_eq!(
            read(&path).unwrap_err().to_string(),
            format!("data file {}: `entries` is empty", path.display())
        );

        let (_dir, path) = write(r#"{"entries": [{"expires_at": "tomorrow"}]}"#);
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "data file {}: entries[0].expires_at: \"tomorrow\" is not a time",
                path.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let err = read(Path::new("/nonexistent/entries.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "cannot read data file /nonexistent/entries.json: \
             No such file or directory (os error 2)"
        );
    }
}
