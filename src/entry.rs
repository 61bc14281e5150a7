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
/// Invariants: `spiffe_id` has a non-root path; `spiffe_id` and `parent_id`
/// are in the same trust domain; there is at least one selector; `hint` is at
/// most [`MAX_HINT_LEN`] bytes; every DNS name is a valid name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Stable identifier chosen by the server (empty before creation).
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
}

// === impl Entry ===

impl Entry {
    /// Converts and validates a wire entry. `td` is the trust domain both IDs
    /// must belong to.
    pub fn from_proto(e: &pb::Entry, td: &TrustDomain) -> Result<Self, FieldError> {
        let spiffe_id = parse_id("spiffe_id", &e.spiffe_id, td)?;
        if !spiffe_id.is_workload_id() {
            return Err(field_error(
                "spiffe_id",
                "must have a path (a trust domain's own ID cannot be an SVID)",
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

        let x509_svid_ttl = match e.x509_svid_ttl {
            0 => None,
            n if n < 0 => return Err(field_error("x509_svid_ttl", "must not be negative")),
            n => {
                let ttl = Duration::from_secs(n.unsigned_abs().into());
                if ttl > MAX_X509_SVID_TTL {
                    return Err(field_error(
                        "x509_svid_ttl",
                        &format!("must be at most {} seconds", MAX_X509_SVID_TTL.as_secs()),
                    ));
                }
                Some(ttl)
            }
        };

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
            x509_svid_ttl: self
                .x509_svid_ttl
                .map_or(0, |ttl| i32::try_from(ttl.as_secs()).unwrap_or(i32::MAX)),
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            revision: self.revision,
            created_at: self.created_at,
        }
    }

    /// Whether two entries would issue the same SVIDs to the same workloads:
    /// same SPIFFE ID, parent and selectors.
    pub fn same_registration(&self, other: &Entry) -> bool {
        self.spiffe_id == other.spiffe_id
            && self.parent_id == other.parent_id
            && self.selectors == other.selectors
    }

    /// Whether a change from `self` to `new` alters the SVIDs issued for it,
    /// so that agents must sign new ones.
    pub fn svid_changed(&self, new: &Entry) -> bool {
        self.spiffe_id != new.spiffe_id
            || self.dns_names != new.dns_names
            || self.x509_svid_ttl != new.x509_svid_ttl
    }
}

fn field_error(field: &str, reason: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
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
        ];
        for (mutate, field) in cases {
            let mut e = wire();
            mutate(&mut e);
            let err = Entry::from_proto(&e, &td()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn only_svid_fields_count_as_svid_changes() {
        let a = Entry::from_proto(&wire(), &td()).unwrap();
        let mut b = a.clone();
        b.hint = "other".into();
        assert!(!a.svid_changed(&b));
        b.dns_names.clear();
        assert!(a.svid_changed(&b));
    }
}
