//! SPIFFE IDs and trust domains.
//!
//! Parsing follows the SPIFFE ID standard
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>) and,
//! where they are stricter, the client libraries Sigil serves: only the
//! lowercase `spiffe://` scheme and a lowercase trust domain are accepted, so
//! every ID Sigil emits parses in go-spiffe (rule ID-5 of the conformance
//! notes). Trust domains with empty labels or a trailing dot are refused,
//! because Go cannot parse certificates that carry them (ID-11).

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted or emitted, in bytes, `spiffe://` included (ID-19).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest trust domain name, in bytes (ID-10, ID-11).
pub const MAX_TRUST_DOMAIN_LEN: usize = 253;

/// Longest label of a trust domain name, in bytes (ID-11).
pub const MAX_LABEL_LEN: usize = 63;

const SCHEME_PREFIX: &str = "spiffe://";

/// Path of the server's own SPIFFE ID in its trust domain: the server's TLS
/// certificate on the agent API carries `spiffe://<td>/sigil/server`.
pub const SERVER_PATH: &str = "/sigil/server";

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The string is empty.
    #[error("is empty")]
    Empty,
    /// The string does not start with the lowercase `spiffe://`.
    #[error("scheme must be lowercase `spiffe://`")]
    WrongScheme,
    /// The trust domain is missing.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// The trust domain has a character outside `a-z 0-9 . - _`.
    #[error(
        "trust domain has the character {0:?}: only lowercase letters, digits, `.`, `-` and `_` are allowed"
    )]
    BadTrustDomainChar(char),
    /// The trust domain has an empty label, or a leading or trailing dot.
    #[error("trust domain has an empty label (leading, trailing or doubled `.`)")]
    EmptyLabel,
    /// The trust domain or one of its labels is too long.
    #[error(
        "trust domain is too long (at most {MAX_TRUST_DOMAIN_LEN} bytes, labels at most {MAX_LABEL_LEN})"
    )]
    TrustDomainTooLong,
    /// The ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// A query or fragment is present.
    #[error("must not have a query or fragment")]
    QueryOrFragment,
    /// A user-info part or a port is present.
    #[error("must not have a user-info part or a port")]
    UserInfoOrPort,
    /// The path has an empty segment, or ends with `/`.
    #[error("path has an empty segment or a trailing `/`")]
    EmptySegment,
    /// The path has a `.` or `..` segment.
    #[error("path has a `.` or `..` segment")]
    DotSegment,
    /// The path has a character outside `a-z A-Z 0-9 . - _`.
    #[error("path has the character {0:?}: only letters, digits, `.`, `-` and `_` are allowed")]
    BadPathChar(char),
    /// A trust domain was given as a SPIFFE ID with a path.
    #[error("a trust domain has no path")]
    UnexpectedPath,
}

/// The name of a trust domain, e.g. `example.org`.
///
/// Invariant: non-empty, at most [`MAX_TRUST_DOMAIN_LEN`] bytes, only
/// `a-z 0-9 . - _`, no empty label, labels at most [`MAX_LABEL_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID: `spiffe://<trust-domain>[/<path>]`.
///
/// Invariant: the string form satisfies every rule of section 1 of the SPIFFE
/// conformance notes; `path` is empty or starts with `/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    td_len: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a trust domain name, or a SPIFFE ID without a path
    /// (`spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, ParseError> {
        if name.starts_with(SCHEME_PREFIX) {
            let id = SpiffeId::from_str(name)?;
            if !id.path().is_empty() {
                return Err(ParseError::UnexpectedPath);
            }
            return Ok(id.trust_domain());
        }
        if name.contains("://") {
            return Err(ParseError::WrongScheme);
        }
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>` (no trailing slash).
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// The server's own SPIFFE ID, `spiffe://<name>/sigil/server`.
    pub fn server_id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME_PREFIX}{}{SERVER_PATH}", self.0),
            td_len: self.0.len(),
        }
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start
    /// with `/`).
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, ParseError> {
        SpiffeId::from_str(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl FromStr for TrustDomain {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The trust domain's name, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        let start = SCHEME_PREFIX.len();
        &self.id[start..start + self.td_len]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[SCHEME_PREFIX.len() + self.td_len..]
    }

    /// Whether this ID has a non-root path, as every leaf X.509-SVID must (X5-3).
    pub fn is_workload_id(&self) -> bool {
        !self.path().is_empty()
    }

    /// Whether this ID belongs to the given trust domain.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ParseError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(ParseError::TooLong);
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            return Err(ParseError::WrongScheme);
        };
        if rest.contains(['?', '#']) {
            return Err(ParseError::QueryOrFragment);
        }

        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.contains(['@', ':']) {
            return Err(ParseError::UserInfoOrPort);
        }
        validate_trust_domain(td)?;
        validate_path(path)?;

        Ok(Self {
            id: s.to_owned(),
            td_len: td.len(),
        })
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = ParseError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

// === validation ===

fn validate_trust_domain(td: &str) -> Result<(), ParseError> {
    if td.is_empty() {
        return Err(ParseError::MissingTrustDomain);
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(ParseError::BadTrustDomainChar(c));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(ParseError::TrustDomainTooLong);
    }
    for label in td.split('.') {
        if label.is_empty() {
            return Err(ParseError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(ParseError::TrustDomainTooLong);
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), ParseError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split item is empty and skipped.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(ParseError::EmptySegment),
            "." | ".." => return Err(ParseError::DotSegment),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(ParseError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
