//! Selectors: properties of a workload or node, written `type:value`.
//!
//! The type names the attestor (`unix`, `k8s`, `join_token`); the value is
//! attestor-specific and may itself contain colons (`unix:uid:1000`,
//! `k8s:pod-label:app:web`). An entry applies to a workload when every one of
//! the entry's selectors is among the workload's.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Longest selector type, in bytes.
pub const MAX_TYPE_LEN: usize = 64;

/// Longest selector value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// There is no `:` between type and value.
    #[error("must be `type:value`")]
    MissingColon,
    /// The type is empty.
    #[error("type is empty")]
    EmptyType,
    /// The type has a character outside `a-z 0-9 _ -`.
    #[error(
        "type has the character {0:?}: only lowercase letters, digits, `_` and `-` are allowed"
    )]
    BadTypeChar(char),
    /// The value is empty.
    #[error("value is empty")]
    EmptyValue,
    /// The value has a control character.
    #[error("value has a control character")]
    ControlChar,
    /// The type or the value is too long.
    #[error("is too long (type at most {MAX_TYPE_LEN} bytes, value at most {MAX_VALUE_LEN})")]
    TooLong,
}

/// One selector.
///
/// Invariant: `kind` is 1 to [`MAX_TYPE_LEN`] bytes of `a-z 0-9 _ -`; `value`
/// is 1 to [`MAX_VALUE_LEN`] bytes with no control character.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

/// A set of selectors, kept sorted and free of duplicates.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selectors(BTreeSet<Selector>);

// === impl Selector ===

impl Selector {
    /// Builds a selector from its parts.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if kind.len() > MAX_TYPE_LEN || value.len() > MAX_VALUE_LEN {
            return Err(SelectorError::TooLong);
        }
        if let Some(c) = kind
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
        {
            return Err(SelectorError::BadTypeChar(c));
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The attestor that produces it, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s.split_once(':').ok_or(SelectorError::MissingColon)?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === impl Selectors ===

impl Selectors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector.
    pub fn insert(&mut self, selector: Selector) {
        self.0.insert(selector);
    }

    /// Whether every selector of `self` is in `other`: an entry with these
    /// selectors applies to a workload that has `other`.
    pub fn is_subset_of(&self, other: &Selectors) -> bool {
        self.0.is_subset(&other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many selectors the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The selectors, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }
}

impl FromIterator<Selector> for Selectors {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl Extend<Selector> for Selectors {
    fn extend<I: IntoIterator<Item = Selector>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl fmt::Debug for Selectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl serde::Serialize for Selectors {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Selectors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(BTreeSet::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    #[test]
    fn value_may_contain_colons() {
        let s = sel("k8s:pod-label:app:web");
        assert_eq!(s.kind(), "k8s");
        assert_eq!(s.value(), "pod-label:app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_reason() {
        assert_eq!("unix".parse::<Selector>(), Err(SelectorError::MissingColon));
        assert_eq!(":1000".parse::<Selector>(), Err(SelectorError::EmptyType));
        assert_eq!("unix:".parse::<Selector>(), Err(SelectorError::EmptyValue));
        assert_eq!(
            "Unix:uid:1".parse::<Selector>(),
            Err(SelectorError::BadTypeChar('U'))
        );
        assert_eq!(
            "unix:uid:\n1".parse::<Selector>(),
            Err(SelectorError::ControlChar)
        );
        let long = format!("unix:{}", "a".repeat(MAX_VALUE_LEN + 1));
        assert_eq!(long.parse::<Selector>(), Err(SelectorError::TooLong));
    }

    #[test]
    fn an_entry_applies_when_its_selectors_are_a_subset() {
        let workload: Selectors = [
            sel("unix:uid:1000"),
            sel("unix:gid:1000"),
            sel("unix:user:app"),
        ]
        .into_iter()
        .collect();
        let entry: Selectors = [sel("unix:uid:1000")].into_iter().collect();
        let other: Selectors = [sel("unix:uid:1000"), sel("unix:gid:0")]
            .into_iter()
            .collect();
        assert!(entry.is_subset_of(&workload));
        assert!(!other.is_subset_of(&workload));
    }

    #[test]
    fn duplicates_collapse() {
        let set: Selectors = [sel("unix:uid:1"), sel("unix:uid:1")].into_iter().collect();
        assert_eq!(set.len(), 1);
    }
}
