//! Facts about certificates the agent receives: validity window, and whether
//! a certificate certifies a given key.

use std::time::{Duration, SystemTime};

use sigil::keys::PrivateKey;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CertError {
    /// Not one DER certificate.
    #[error("not a DER X.509 certificate")]
    Malformed,
    /// The validity dates are before the Unix epoch.
    #[error("validity dates out of range")]
    Dates,
    /// The key cannot be read.
    #[error("the private key is unusable: {0}")]
    Key(String),
    /// The certificate is for another key.
    #[error("the certificate does not match the private key")]
    KeyMismatch,
}

/// The notBefore and notAfter of a DER certificate.
pub(crate) fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), CertError> {
    let cert = parse(der)?;
    let at = |secs: i64| {
        u64::try_from(secs)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| CertError::Dates)
    };
    Ok((
        at(cert.validity().not_before.timestamp())?,
        at(cert.validity().not_after.timestamp())?,
    ))
}

/// Checks that the certificate's public key is the public half of `key`.
pub(crate) fn check_key_matches(der: &[u8], key: &PrivateKey) -> Result<(), CertError> {
    let cert = parse(der)?;
    let pair = key.key_pair().map_err(|e| CertError::Key(e.to_string()))?;
    if cert.public_key().subject_public_key.data.as_ref() == pair.public_key_raw() {
        Ok(())
    } else {
        Err(CertError::KeyMismatch)
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(CertError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil::TrustDomain;
    use sigil::x509::Authority;

    #[test]
    fn validity_and_key_match_are_read_from_the_leaf() {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Authority::self_signed(&td, Duration::from_secs(3600)).unwrap();
        let key = PrivateKey::generate_p256().unwrap();
        let id = td.id_with_path("/web").unwrap();
        let svid = ca
            .sign_leaf(&key.key_pair().unwrap(), &id, &[], Duration::from_secs(600))
            .unwrap();
        let (nb, na) = validity(&svid.chain[0]).unwrap();
        assert_eq!(na, svid.not_after);
        assert_eq!(na.duration_since(nb).unwrap(), Duration::from_secs(610));
        check_key_matches(&svid.chain[0], &key).unwrap();
        let other = PrivateKey::generate_p256().unwrap();
        assert_eq!(
            check_key_matches(&svid.chain[0], &other),
            Err(CertError::KeyMismatch)
        );
        assert_eq!(validity(b"junk"), Err(CertError::Malformed));
    }
}
