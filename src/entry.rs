//! Registration entries: which workloads (selectors), running under which
//! parent (an agent or another entry's SPIFFE ID), are entitled to which
//! SPIFFE ID.
//!
//! [`Entry`] is the validated form both binaries work with; the wire form is
//! [`proto::Entry`](crate::proto::sigil::types::v1::Entry). Conversion from the
//! wire checks every field and names the field that is wrong.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::sigil::types::v1 as pb;
use crate::{Selector, Selectors, SpiffeId, TrustDomain};

/// Longest hint, in bytes (WA-29).
pub const MAX_HINT_LEN: usize = 1024;

/// Most selectors one entry may have.
pub const MAX_SELECTORS: usize = 64;

/// Longest X.509-SVID lifetime an entry may ask for: 30 days.
pub const MAX_X509_SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest JWT-SVID lifetime an entry may ask for: 30 days.
pub const MAX_JWT_SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest entry ID, in bytes.
pub const MAX_ENTRY_ID_LEN: usize = 255;

/// Most trust domains one entry may federate with.
pub const MAX_FEDERATES_WITH: usize = 64;

/// A field of an entry that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field's name, e.g. `spiffe_id` or `selectors[2]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A validated registration entry.
///
/// Invariants: `id` is empty or a valid entry ID (see
/// [`validate_entry_id`]); `spiffe_id` has a non-root path; `spiffe_id` and
/// `parent_id` are in the same trust domain; there is at least one selector;
/// `hint` is at most [`MAX_HINT_LEN`] bytes; every DNS name is a valid name;
/// `federates_with` is sorted, without duplicates and without the entry's
/// own trust domain.
///
/// Fields added after the first release carry `#[serde(default)]`, so entries
/// stored before them still load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Stable identifier, chosen by the creator or the server (empty before
    /// creation).
    pub id: String,
    /// The SPIFFE ID the entry's SVIDs carry.
    pub spiffe_id: SpiffeId,
    /// The agent or entry the workloads run under.
    pub parent_id: SpiffeId,
    /// All of them must match the workload.
    pub selectors: Selectors,
    /// Lifetime of the X.509-SVIDs; `None` means the server's default.
    pub x509_svid_ttl: Option<Duration>,
    /// DNS SANs of the X.509-SVIDs.
    pub dns_names: Vec<String>,
    /// Operator label passed to workloads.
    pub hint: String,
    /// Increases on every change; set by the server.
    pub revision: u64,
    /// Seconds since the Unix epoch; set by the server.
    pub created_at: i64,
    /// Lifetime of the JWT-SVIDs; `None` means the server's default.
    #[serde(default)]
    pub jwt_svid_ttl: Option<Duration>,
    /// Other trust domains whose bundles the workloads receive.
    #[serde(default)]
    pub federates_with: Vec<TrustDomain>,
    /// Whether the workloads may call the admin API.
    #[serde(default)]
    pub admin: bool,
    /// Whether the workloads may mint SVIDs for others.
    #[serde(default)]
    pub downstream: bool,
    /// Seconds since the Unix epoch after which the entry issues no SVIDs;
    /// `None` means never.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

// === impl Entry ===

impl Entry {
    /// Converts and validates a wire entry. `td` is the trust domain both IDs
    /// must belong to.
    pub fn from_proto(e: &pb::Entry, td: &TrustDomain) -> Result<Self, FieldError> {
        if !e.id.is_empty() {
            validate_entry_id(&e.id).map_err(|reason| field_error("id", reason))?;
        }
        let spiffe_id = parse_id("spiffe_id", &e.spiffe_id, td)?;
        if !spiffe_id.is_workload_id() {
            return Err(field_error(
                "spiffe_id",
                "must have a path (a trust domain's own ID cannot be an SVID)",
            ));
        }
        if is_reserved(&spiffe_id) {
            return Err(field_error(
                "spiffe_id",
                &format!(
                    "{:?} is under /sigil/, which is reserved for the server and agents",
                    e.spiffe_id
                ),
            ));
        }
        let parent_id = parse_id("parent_id", &e.parent_id, td)?;

        if e.selectors.is_empty() {
            return Err(field_error(
                "selectors",
                "at least one selector is required",
            ));
        }
        if e.selectors.len() > MAX_SELECTORS {
            return Err(field_error(
                "selectors",
                &format!("at most {MAX_SELECTORS} selectors are allowed"),
            ));
        }
        let mut selectors = Selectors::new();
        for (i, s) in e.selectors.iter().enumerate() {
            let selector = Selector::new(&s.r#type, &s.value)
                .map_err(|err| field_error(&format!("selectors[{i}]"), &err.to_string()))?;
            selectors.insert(selector);
        }

        let x509_svid_ttl = parse_ttl("x509_svid_ttl", e.x509_svid_ttl, MAX_X509_SVID_TTL)?;
        let jwt_svid_ttl = parse_ttl("jwt_svid_ttl", e.jwt_svid_ttl, MAX_JWT_SVID_TTL)?;

        if e.dns_names.len() > crate::x509::MAX_DNS_NAMES {
            return Err(field_error(
                "dns_names",
                &format!("at most {} names are allowed", crate::x509::MAX_DNS_NAMES),
            ));
        }
        for (i, name) in e.dns_names.iter().enumerate() {
            validate_dns_name(name)
                .map_err(|reason| field_error(&format!("dns_names[{i}]"), reason))?;
        }

        if e.hint.len() > MAX_HINT_LEN {
            return Err(field_error(
                "hint",
                &format!("must be at most {MAX_HINT_LEN} bytes"),
            ));
        }
        if e.hint.chars().any(char::is_control) {
            return Err(field_error("hint", "must not contain control characters"));
        }

        let federates_with = parse_federates_with(&e.federates_with, td)?;
        let expires_at = match e.expires_at {
            0 => None,
            n if n < 0 => return Err(field_error("expires_at", "must not be negative")),
            n => Some(n),
        };

        Ok(Self {
            id: e.id.clone(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            revision: e.revision,
            created_at: e.created_at,
            jwt_svid_ttl,
            federates_with,
            admin: e.admin,
            downstream: e.downstream,
            expires_at,
        })
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::Entry {
        pb::Entry {
            id: self.id.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self
                .selectors
                .iter()
                .map(|s| pb::Selector {
                    r#type: s.kind().to_owned(),
                    value: s.value().to_owned(),
                })
                .collect(),
            x509_svid_ttl: ttl_seconds(self.x509_svid_ttl),
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            revision: self.revision,
            created_at: self.created_at,
            jwt_svid_ttl: ttl_seconds(self.jwt_svid_ttl),
            federates_with: self
                .federates_with
                .iter()
                .map(|td| td.name().to_owned())
                .collect(),
            admin: self.admin,
            downstream: self.downstream,
            expires_at: self.expires_at.unwrap_or(0),
        }
    }

    /// Whether the entry has expired at `now` (seconds since the Unix
    /// epoch): it issues no SVIDs from its `expires_at` on.
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether two entries would issue the same SVIDs to the same workloads:
    /// same SPIFFE ID, parent and selectors.
    pub fn same_registration(&self, other: &Entry) -> bool {
        self.spiffe_id == other.spiffe_id
            && self.parent_id == other.parent_id
            && self.selectors == other.selectors
    }

    /// Whether a change from `self` to `new` alters the X.509-SVIDs issued
    /// for it, so that agents must sign new ones. The JWT-SVID lifetime,
    /// federation, the admin and downstream flags and the expiry do not
    /// appear in X.509-SVIDs. Nor do the selectors and the parent: they
    /// decide which workloads and agents get the entry's SVID, not what it
    /// says, so an agent that still holds the entry after such a change
    /// serves the SVID it has to the workloads that now match, and an agent
    /// that gains the entry signs one as for any new entry.
    pub fn svid_changed(&self, new: &Entry) -> bool {
        self.spiffe_id != new.spiffe_id
            || self.dns_names != new.dns_names
            || self.x509_svid_ttl != new.x509_svid_ttl
    }
}

/// Whether `id` is under `/sigil/`, the paths of the server's and the
/// agents' own IDs, which no entry may issue.
fn is_reserved(id: &SpiffeId) -> bool {
    let path = id.path();
    path == RESERVED_PATH
        || path
            .strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The path prefix of the server's and the agents' own IDs.
const RESERVED_PATH: &str = "/sigil";

fn field_error(field: &str, reason: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse_ttl(field: &str, seconds: i32, max: Duration) -> Result<Option<Duration>, FieldError> {
    match seconds {
        0 => Ok(None),
        n if n < 0 => Err(field_error(field, "must not be negative")),
        n => {
            let ttl = Duration::from_secs(n.unsigned_abs().into());
            if ttl > max {
                return Err(field_error(
                    field,
                    &format!("must be at most {} seconds", max.as_secs()),
                ));
            }
            Ok(Some(ttl))
        }
    }
}

fn ttl_seconds(ttl: Option<Duration>) -> i32 {
    ttl.map_or(0, |ttl| i32::try_from(ttl.as_secs()).unwrap_or(i32::MAX))
}

fn parse_federates_with(
    names: &[String],
    td: &TrustDomain,
) -> Result<Vec<TrustDomain>, FieldError> {
    if names.len() > MAX_FEDERATES_WITH {
        return Err(field_error(
            "federates_with",
            &format!("at most {MAX_FEDERATES_WITH} trust domains are allowed"),
        ));
    }
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let field = format!("federates_with[{i}]");
        let other =
            TrustDomain::new(name).map_err(|e| field_error(&field, &format!("{name:?} {e}")))?;
        if other == *td {
            return Err(field_error(
                &field,
                &format!("{name:?} is the entry's own trust domain"),
            ));
        }
        out.push(other);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Checks a user-supplied entry ID: 1 to [`MAX_ENTRY_ID_LEN`] bytes of ASCII
/// letters, digits, `-`, `_` and `.`.
pub fn validate_entry_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_ENTRY_ID_LEN {
        return Err("must be 1 to 255 bytes");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("only ASCII letters, digits, `-`, `_` and `.` are allowed");
    }
    Ok(())
}

fn parse_id(field: &str, value: &str, td: &TrustDomain) -> Result<SpiffeId, FieldError> {
    if value.is_empty() {
        return Err(field_error(field, "is required"));
    }
    let id: SpiffeId = value
        .parse()
        .map_err(|e: crate::spiffe_id::ParseError| field_error(field, &format!("{value:?} {e}")))?;
    if !id.is_member_of(td) {
        return Err(field_error(
            field,
            &format!("{value:?} is not in trust domain {td}"),
        ));
    }
    Ok(id)
}

/// Checks a DNS name for an X.509 SAN: 1 to 253 bytes, labels of 1 to 63
/// letters, digits or hyphens (a leading `*.` wildcard is allowed).
pub fn validate_dns_name(name: &str) -> Result<(), &'static str> {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 bytes");
    }
    for label in rest.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("labels must be 1 to 63 bytes");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("only letters, digits, `-` and `.` are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels must not start or end with `-`");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn wire() -> pb::Entry {
        pb::Entry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/sigil/agent/join_token/abc".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            x509_svid_ttl: 600,
            dns_names: vec!["web.example.org".into()],
            hint: "internal".into(),
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_through_the_wire_form() {
        let entry = Entry::from_proto(&wire(), &td()).unwrap();
        assert_eq!(entry.x509_svid_ttl, Some(Duration::from_secs(600)));
        assert_eq!(Entry::from_proto(&entry.to_proto(), &td()).unwrap(), entry);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = fn(&mut pb::Entry);
        let cases: Vec<(Mutation, &str)> = vec![
            (|e| e.spiffe_id = "spiffe://example.org".into(), "spiffe_id"),
            (
                |e| e.spiffe_id = "spiffe://other.org/web".into(),
                "spiffe_id",
            ),
            (
                |e| e.spiffe_id = "spiffe://example.org/a//b".into(),
                "spiffe_id",
            ),
            (|e| e.parent_id = String::new(), "parent_id"),
            (|e| e.selectors.clear(), "selectors"),
            (|e| e.selectors[0].value = String::new(), "selectors[0]"),
            (|e| e.x509_svid_ttl = -1, "x509_svid_ttl"),
            (|e| e.dns_names.push("bad name".into()), "dns_names[1]"),
            (|e| e.hint = "x".repeat(MAX_HINT_LEN + 1), "hint"),
            (|e| e.jwt_svid_ttl = -5, "jwt_svid_ttl"),
            (|e| e.jwt_svid_ttl = i32::MAX, "jwt_svid_ttl"),
            (
                |e| e.federates_with = vec!["Bad!".into()],
                "federates_with[0]",
            ),
            (
                |e| e.federates_with = vec!["a.org".into(), "example.org".into()],
                "federates_with[1]",
            ),
            (|e| e.expires_at = -1, "expires_at"),
            (|e| e.id = "has space".into(), "id"),
            (|e| e.id = "x".repeat(MAX_ENTRY_ID_LEN + 1), "id"),
            (
                |e| e.spiffe_id = "spiffe://example.org/sigil/server".into(),
                "spiffe_id",
            ),
            (
                |e| e.spiffe_id = "spiffe://example.org/sigil/agent/join_token/x".into(),
                "spiffe_id",
            ),
            (
                |e| e.spiffe_id = "spiffe://example.org/sigil".into(),
                "spiffe_id",
            ),
        ];
        for (mutate, field) in cases {
            let mut e = wire();
            mutate(&mut e);
            let err = Entry::from_proto(&e, &td()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn new_fields_round_trip_and_federation_is_a_sorted_set() {
        let mut w = wire();
        w.id = "web-1_a.b".into();
        w.jwt_svid_ttl = 300;
        w.federates_with = vec![
            "partner.org".into(),
            "spiffe://bank.example".into(),
            "partner.org".into(),
        ];
        w.admin = true;
        w.downstream = true;
        w.expires_at = 1_900_000_000;
        let entry = Entry::from_proto(&w, &td()).unwrap();
        assert_eq!(entry.id, "web-1_a.b");
        assert_eq!(entry.jwt_svid_ttl, Some(Duration::from_secs(300)));
        assert_eq!(entry.expires_at, Some(1_900_000_000));
        let wire_back = entry.to_proto();
        assert_eq!(wire_back.federates_with, ["bank.example", "partner.org"]);
        assert!(wire_back.admin && wire_back.downstream);
        assert_eq!(wire_back.expires_at, 1_900_000_000);
        assert_eq!(Entry::from_proto(&wire_back, &td()).unwrap(), entry);

        assert!(!entry.is_expired(1_899_999_999));
        assert!(entry.is_expired(1_900_000_000));
        let never = Entry::from_proto(&wire(), &td()).unwrap();
        assert_eq!(never.expires_at, None);
        assert!(!never.is_expired(i64::MAX));
    }

    #[test]
    fn entries_stored_without_the_newer_fields_still_load() {
        let mut stored = serde_json::to_value(Entry::from_proto(&wire(), &td()).unwrap()).unwrap();
        let object = stored.as_object_mut().unwrap();
        for field in [
            "jwt_svid_ttl",
            "federates_with",
            "admin",
            "downstream",
            "expires_at",
        ] {
            assert!(object.remove(field).is_some(), "{field}");
        }
        let entry: Entry = serde_json::from_value(stored).unwrap();
        assert_eq!(entry, Entry::from_proto(&wire(), &td()).unwrap());
    }

    #[test]
    fn ids_under_sigil_are_reserved_but_parents_there_are_fine() {
        let mut e = wire();
        e.spiffe_id = "spiffe://example.org/sigil/server".into();
        assert_eq!(
            Entry::from_proto(&e, &td()).unwrap_err().to_string(),
            "spiffe_id: \"spiffe://example.org/sigil/server\" is under /sigil/, which is reserved for the server and agents"
        );
        // A path that merely starts with the same letters is fine, and so is
        // a parent under /sigil/ (agents and the server's alias entries).
        e.spiffe_id = "spiffe://example.org/sigilant".into();
        e.parent_id = "spiffe://example.org/sigil/server".into();
        assert!(Entry::from_proto(&e, &td()).is_ok());
    }

    #[test]
    fn entry_ids_are_checked() {
        assert!(validate_entry_id("a").is_ok());
        assert!(validate_entry_id(&"a".repeat(MAX_ENTRY_ID_LEN)).is_ok());
        assert_eq!(validate_entry_id(""), Err("must be 1 to 255 bytes"));
        assert_eq!(
            validate_entry_id("a/b"),
            Err("only ASCII letters, digits, `-`, `_` and `.` are allowed")
        );
    }

    #[test]
    fn only_svid_fields_count_as_svid_changes() {
        let a = Entry::from_proto(&wire(), &td()).unwrap();
        let mut b = a.clone();
        b.hint = "other".into();
        b.jwt_svid_ttl = Some(Duration::from_secs(60));
        b.federates_with = vec![TrustDomain::new("partner.org").unwrap()];
        b.admin = true;
        b.downstream = true;
        b.expires_at = Some(1);
        assert!(!a.svid_changed(&b));
        b.dns_names.clear();
        assert!(a.svid_changed(&b));
    }
}
