//! Which authority signed a certificate, which authorities a bundle holds,
//! and how soon an SVID signed by a tainted authority is replaced.
//!
//! Replacements are spread uniformly over a window of
//! `min(`[`MAX_TAINT_WINDOW`]`, 10 % of the remaining lifetime)` so that
//! every agent of the trust domain does not ask the server at once.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use sigil::bundle::X509Bundle;

use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The longest window over which replacements are spread.
pub(crate) const MAX_TAINT_WINDOW: Duration = Duration::from_secs(30);

/// The part of the remaining lifetime the window may take at most.
const WINDOW_FRACTION: f64 = 0.1;

/// The key identifier of the authority key identifier extension of a DER
/// certificate: the subject key identifier of the authority that signed it.
pub(crate) fn authority_key_id(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// The subject key identifiers of a bundle's authorities (those that have
/// one).
pub(crate) fn subject_key_ids(bundle: &X509Bundle) -> HashSet<Vec<u8>> {
    bundle
        .authorities()
        .iter()
        .filter_map(|der| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            cert.extensions()
                .iter()
                .find_map(|ext| match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
                    _ => None,
                })
        })
        .collect()
}

/// When an SVID valid until `not_after` signed by a tainted authority is
/// replaced, seen at `now`: `draw` (in `[0, 1)`) of the way into the
/// window.
pub(crate) fn replacement_time(now: SystemTime, not_after: SystemTime, draw: f64) -> SystemTime {
    let remaining = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    let window = MAX_TAINT_WINDOW.min(remaining.mul_f64(WINDOW_FRACTION));
    now + window.mul_f64(draw.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn the_window_is_30_s_or_a_tenth_of_what_remains() {
        assert_eq!(replacement_time(t(0), t(3_600), 0.5), t(15));
        assert_eq!(replacement_time(t(0), t(100), 0.5), t(5));
        assert_eq!(replacement_time(t(0), t(100), 0.0), t(0));
        assert_eq!(replacement_time(t(200), t(100), 0.9), t(200));
    }
}
