//! Checks that a certificate follows the X.509-SVID profiles, the way the
//! strictest SPIFFE client libraries do (section 2 of the conformance notes).

use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::SpiffeId;
use crate::spiffe_id::ParseError;

/// How a certificate breaks the X.509-SVID profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The bytes are not one DER certificate.
    #[error("not a DER X.509 certificate")]
    Malformed,
    /// The certificate is not X.509 v3.
    #[error("not an X.509 v3 certificate")]
    NotV3,
    /// There is not exactly one URI SAN (X5-1).
    #[error("must have exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(ParseError),
    /// A leaf's SPIFFE ID has no path (X5-3).
    #[error("leaf SPIFFE ID has no path")]
    RootPath,
    /// An extension appears twice (X5-14).
    #[error("extension {0} appears more than once")]
    DuplicateExtension(String),
    /// BasicConstraints is missing, not critical, or has the wrong CA flag
    /// (X5-7, X5-8).
    #[error("BasicConstraints must be present, critical and CA:{expected}")]
    BasicConstraints {
        /// The CA flag the profile requires.
        expected: bool,
    },
    /// KeyUsage is missing, not critical, or has the wrong bits (X5-11..X5-14).
    #[error("KeyUsage must be present and critical, with {0}")]
    KeyUsage(&'static str),
    /// EKU lacks serverAuth or clientAuth (X5-15, X5-16).
    #[error("ExtendedKeyUsage, when present, must include serverAuth and clientAuth")]
    ExtendedKeyUsage,
    /// An empty subject without a critical SAN extension (X5-5), or a CA with
    /// an empty subject (X5-6).
    #[error("an empty subject needs a critical SAN extension, and a CA needs a subject")]
    Subject,
    /// A critical extension no client understands.
    #[error("unknown critical extension {0}")]
    UnknownCritical(String),
}

/// Checks a leaf X.509-SVID (X5-18) and returns its SPIFFE ID.
pub fn check_leaf(der: &[u8]) -> Result<SpiffeId, CheckError> {
    let cert = parse(der)?;
    check_extensions(&cert, false)?;
    let id = single_spiffe_id(&cert)?;
    if !id.is_workload_id() {
        return Err(CheckError::RootPath);
    }
    Ok(id)
}

/// Checks a signing certificate (X5-19).
pub fn check_ca(der: &[u8]) -> Result<(), CheckError> {
    let cert = parse(der)?;
    check_extensions(&cert, true)?;
    if cert.subject().iter().next().is_none() {
        return Err(CheckError::Subject);
    }
    Ok(())
}

/// The SPIFFE ID in a certificate's single URI SAN (X5-1).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CheckError> {
    single_spiffe_id(&parse(der)?)
}

/// A certificate's notAfter.
pub fn not_after(der: &[u8]) -> Result<SystemTime, CheckError> {
    let cert = parse(der)?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).map_err(|_| CheckError::Malformed)?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CheckError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(CheckError::Malformed),
    }
}

fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, CheckError> {
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(CheckError::DuplicateExtension("subjectAltName".into())),
    };
    match uris.as_slice() {
        [uri] => uri.parse().map_err(CheckError::BadSpiffeId),
        other => Err(CheckError::UriSanCount(other.len())),
    }
}

fn check_extensions(cert: &X509Certificate<'_>, ca: bool) -> Result<(), CheckError> {
    if cert.version().0 != 2 {
        return Err(CheckError::NotV3);
    }

    let mut seen = std::collections::HashSet::new();
    let mut basic_constraints = None;
    let mut key_usage = None;
    let mut san_critical = false;
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        if !seen.insert(oid.clone()) {
            return Err(CheckError::DuplicateExtension(oid));
        }
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                basic_constraints = Some((ext.critical, bc.ca))
            }
            ParsedExtension::KeyUsage(ku) => key_usage = Some((ext.critical, *ku)),
            ParsedExtension::ExtendedKeyUsage(eku)
                if !(eku.any || (eku.server_auth && eku.client_auth)) =>
            {
                return Err(CheckError::ExtendedKeyUsage);
            }
            ParsedExtension::SubjectAlternativeName(_) => san_critical = ext.critical,
            ParsedExtension::ExtendedKeyUsage(_)
            | ParsedExtension::AuthorityKeyIdentifier(_)
            | ParsedExtension::SubjectKeyIdentifier(_) => {}
            _ if ext.critical => return Err(CheckError::UnknownCritical(oid)),
            _ => {}
        }
    }

    match basic_constraints {
        Some((true, is_ca)) if is_ca == ca => {}
        _ => return Err(CheckError::BasicConstraints { expected: ca }),
    }
    let Some((true, ku)) = key_usage else {
        return Err(CheckError::KeyUsage(if ca {
            "keyCertSign"
        } else {
            "digitalSignature"
        }));
    };
    if ca {
        if !ku.key_cert_sign() {
            return Err(CheckError::KeyUsage("keyCertSign"));
        }
    } else if !ku.digital_signature() || ku.key_cert_sign() || ku.crl_sign() {
        return Err(CheckError::KeyUsage(
            "digitalSignature and without keyCertSign or cRLSign",
        ));
    }
    if cert.subject().iter().next().is_none() && !san_critical {
        return Err(CheckError::Subject);
    }

    Ok(())
}
