//! X.509 trust bundles: the CA certificates of one trust domain.
//!
//! A bundle travels as concatenated DER on the Workload API, as PEM for
//! operators and `openssl`, and as a SPIFFE bundle (a JWK Set, rules TB-1,
//! X5-20..X5-22) for federation.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::TrustDomain;

/// Why a bundle could not be read or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The PEM input holds no certificate.
    #[error("no certificate found")]
    Empty,
    /// A PEM block or DER certificate is malformed.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// A SPIFFE bundle document is not a JWK Set of x509-svid keys.
    #[error("malformed bundle document: {0}")]
    Document(String),
    /// A CA's key type cannot be written as a JWK.
    #[error("unsupported public key type for a JWK")]
    UnsupportedKey,
}

/// The X.509 authorities of one trust domain.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Bundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
}

// === impl X509Bundle ===

impl X509Bundle {
    /// A bundle of the given DER certificates.
    pub fn new(trust_domain: TrustDomain, authorities: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trust_domain,
            authorities,
        }
    }

    /// Reads PEM certificates (`-----BEGIN CERTIFICATE-----` blocks).
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let authorities = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        if authorities.is_empty() {
            return Err(BundleError::Empty);
        }
        for der in &authorities {
            parse(der)?;
        }
        Ok(Self::new(trust_domain, authorities))
    }

    /// Reads a SPIFFE bundle document (a JWK Set): the `x5c` certificate of
    /// every `x509-svid` key; keys for other uses (`jwt-svid`) are skipped.
    /// Returns the bundle and its `spiffe_sequence`, if any.
    pub fn from_spiffe_json(
        trust_domain: TrustDomain,
        json: &[u8],
    ) -> Result<(Self, Option<u64>), BundleError> {
        let doc: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| BundleError::Document(format!("not JSON: {e}")))?;
        let keys = doc
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| BundleError::Document("no `keys` array".into()))?;
        let mut authorities = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if key.get("use").and_then(serde_json::Value::as_str) != Some("x509-svid") {
                continue;
            }
            let x5c = match key.get("x5c").and_then(serde_json::Value::as_array) {
                Some(x5c) if x5c.len() == 1 => &x5c[0],
                _ => {
                    return Err(BundleError::Document(format!(
                        "keys[{i}]: an x509-svid key needs exactly one x5c certificate"
                    )));
                }
            };
            let der = x5c
                .as_str()
                .and_then(|b64| STANDARD.decode(b64).ok())
                .ok_or_else(|| BundleError::Document(format!("keys[{i}].x5c[0]: not base64")))?;
            parse(&der).map_err(|e| BundleError::Malformed(format!("keys[{i}].x5c[0]: {e}")))?;
            authorities.push(CertificateDer::from(der));
        }
        if authorities.is_empty() {
            return Err(BundleError::Empty);
        }
        let sequence = doc
            .get("spiffe_sequence")
            .and_then(serde_json::Value::as_u64);
        Ok((Self::new(trust_domain, authorities), sequence))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificates.
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// The certificates as one concatenated DER byte string, the Workload
    /// API's form.
    pub fn to_concatenated_der(&self) -> Vec<u8> {
        concatenate(&self.authorities)
    }

    /// The certificates as PEM blocks.
    pub fn to_pem(&self) -> String {
        self.authorities
            .iter()
            .map(|der| cert_to_pem(der))
            .collect()
    }

    /// The bundle as a SPIFFE bundle document (a JWK Set with one
    /// `x509-svid` key per CA, each with exactly one `x5c` certificate and
    /// the key parameters that match it).
    pub fn to_spiffe_json(
        &self,
        sequence: u64,
        refresh_hint_secs: u64,
    ) -> Result<String, BundleError> {
        let keys = self
            .authorities
            .iter()
            .map(|der| x509_jwk(der))
            .collect::<Result<Vec<_>, _>>()?;
        let doc = serde_json::json!({
            "keys": keys,
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        });
        serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Malformed(e.to_string()))
    }
}

impl std::fmt::Debug for X509Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Bundle")
            .field("trust_domain", &self.trust_domain)
            .field("authorities", &self.authorities.len())
            .finish()
    }
}

/// Concatenates DER certificates.
pub fn concatenate(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(certs.iter().map(|c| c.len()).sum());
    for cert in certs {
        out.extend_from_slice(cert);
    }
    out
}

/// One certificate as a PEM block.
pub fn cert_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn parse(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, BundleError> {
    match x509_parser::certificate::X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(BundleError::Malformed(
            "trailing bytes after certificate".into(),
        )),
        Err(e) => Err(BundleError::Malformed(e.to_string())),
    }
}

fn x509_jwk(der: &[u8]) -> Result<serde_json::Value, BundleError> {
    let cert = parse(der)?;
    let spki = cert.public_key();
    let x5c = [STANDARD.encode(der)];
    let key = spki.parsed().map_err(|_| BundleError::UnsupportedKey)?;
    let jwk = match key {
        PublicKey::EC(point) => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let (crv, len) = match curve_oid.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                _ => return Err(BundleError::UnsupportedKey),
            };
            let data = point.data();
            // An uncompressed point: 0x04 || x || y.
            if data.len() != 1 + 2 * len || data.first() != Some(&4) {
                return Err(BundleError::UnsupportedKey);
            }
            let (x, y) = data[1..].split_at(len);
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "x5c": x5c,
            })
        }
        PublicKey::RSA(rsa) => serde_json::json!({
            "use": "x509-svid",
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.modulus)),
            "e": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.exponent)),
            "x5c": x5c,
        }),
        _ => return Err(BundleError::UnsupportedKey),
    };
    Ok(jwk)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::x509::Authority;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn pem_round_trips() {
        let ca = Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap();
        let bundle = X509Bundle::new(td(), vec![ca.cert().clone()]);
        let back = X509Bundle::from_pem(td(), bundle.to_pem().as_bytes()).unwrap();
        assert_eq!(back, bundle);
        assert_eq!(back.to_concatenated_der(), ca.cert().to_vec());
    }

    #[test]
    fn pem_without_certificates_is_refused() {
        assert_eq!(
            X509Bundle::from_pem(td(), b"hello"),
            Err(BundleError::Empty)
        );
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            X509Bundle::from_pem(td(), bad.as_bytes()),
            Err(BundleError::Malformed(_))
        ));
    }

    #[test]
    fn spiffe_json_round_trips_and_skips_jwt_keys() {
        let a = Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap();
        let b = Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap();
        let bundle = X509Bundle::new(td(), vec![a.cert().clone(), b.cert().clone()]);
        let mut doc: serde_json::Value =
            serde_json::from_str(&bundle.to_spiffe_json(3, 300).unwrap()).unwrap();
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"use": "jwt-svid", "kty": "EC", "kid": "k"}));
        let json = serde_json::to_vec(&doc).unwrap();
        let (back, sequence) = X509Bundle::from_spiffe_json(td(), &json).unwrap();
        assert_eq!(back, bundle);
        assert_eq!(sequence, Some(3));
    }

    #[test]
    fn bad_spiffe_json_is_refused_with_the_reason() {
        let cases: [(&str, &str); 4] = [
            ("[", "malformed bundle document: not JSON: "),
            ("{}", "malformed bundle document: no `keys` array"),
            (
                r#"{"keys": [{"use": "x509-svid", "x5c": []}]}"#,
                "malformed bundle document: keys[0]: an x509-svid key needs exactly one x5c certificate",
            ),
            (
                r#"{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}"#,
                "malformed certificate: keys[0].x5c[0]: ",
            ),
        ];
        for (json, prefix) in cases {
            let err = X509Bundle::from_spiffe_json(td(), json.as_bytes()).unwrap_err();
            assert!(err.to_string().starts_with(prefix), "{json}: {err}");
        }
        assert_eq!(
            X509Bundle::from_spiffe_json(td(), br#"{"keys": []}"#),
            Err(BundleError::Empty)
        );
    }

    /// X5-20, X5-21, X5-22, TB-1.
    #[test]
    fn spiffe_json_has_one_x5c_per_key_and_matching_ec_params() {
        let ca = Authority::self_signed(&td(), Duration::from_secs(3600)).unwrap();
        let bundle = X509Bundle::new(td(), vec![ca.cert().clone()]);
        let doc: serde_json::Value =
            serde_json::from_str(&bundle.to_spiffe_json(7, 300).unwrap()).unwrap();
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        let key = &keys[0];
        assert_eq!(key["use"], "x509-svid");
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert!(key.get("kid").is_none());
        let x5c = key["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
            ca.cert().to_vec()
        );

        // The JWK's point is the certificate's public key.
        let cert = parse(ca.cert()).unwrap();
        let point = cert.public_key().subject_public_key.data.to_vec();
        let x = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(key["y"].as_str().unwrap()).unwrap();
        assert_eq!([&[4u8][..], &x, &y].concat(), point);
    }
}
