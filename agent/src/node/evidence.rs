//! The evidence each node attestor presents to the server, read from its
//! files at each attestation (so that renewed certificates and rotated
//! tokens are picked up), and the answer to the x509pop challenge.

use std::fmt;
use std::path::Path;

use prost::Message as _;
use rcgen::SigningKey as _;
use ring::signature::RsaKeyPair;
use sigil::proto::sigil::agent::v1::{AttestationData, K8sPsatAttestation, X509PopAttestation};
use zeroize::Zeroizing;

use super::NodeError;
use super::settings::NodeAttestorConfig;
use crate::config::JoinToken;

/// What the agent presents, and how it answers a challenge. `Debug` shows
/// the attestor only: the payload may be a join token or a service account
/// token.
pub(crate) struct Evidence {
    /// The first message's attestation data.
    pub(crate) data: AttestationData,
    /// The x509pop proof of possession, if the attestor has one.
    pub(crate) prover: Option<Prover>,
}

/// Signs x509pop challenges with the node certificate's key.
pub(crate) struct Prover {
    leaf: Vec<u8>,
    key: NodeKey,
}

enum NodeKey {
    /// PKCS#8 ECDSA (P-256, P-384), Ed25519 or RSA, through rcgen.
    Pkcs8(rcgen::KeyPair),
    /// PKCS#1 RSA.
    Rsa(RsaKeyPair),
}

impl fmt::Debug for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Evidence")
            .field("type", &self.data.r#type)
            .field("payload", &"[redacted]")
            .field("prover", &self.prover)
            .finish()
    }
}

impl fmt::Debug for Prover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Prover([key redacted])")
    }
}

impl Evidence {
    /// A join token's evidence.
    pub(crate) fn join_token(token: &JoinToken) -> Self {
        Self {
            data: AttestationData {
                r#type: "join_token".to_owned(),
                payload: token.expose().as_bytes().to_vec(),
            },
            prover: None,
        }
    }

    /// Reads the evidence of an x509pop or k8s_psat attestor.
    pub(crate) fn read(config: &NodeAttestorConfig) -> Result<Self, NodeError> {
        match config {
            NodeAttestorConfig::JoinToken => Err(NodeError::Evidence(
                "join token attestation needs a token".into(),
            )),
            NodeAttestorConfig::X509Pop {
                certificate_path,
                private_key_path,
                intermediates_path,
            } => {
                let mut chain = read_certs(certificate_path)?;
                if let Some(path) = intermediates_path {
                    chain.extend(read_certs(path)?);
                }
                let key = read_key(private_key_path)?;
                let leaf = chain.first().cloned().unwrap_or_default();
                let prover = Prover { leaf, key };
                // Checked now, so that a key that does not match the
                // certificate is named as such rather than refused later.
                prover.check_matches(certificate_path)?;
                Ok(Self {
                    data: AttestationData {
                        r#type: config.name().to_owned(),
                        payload: X509PopAttestation { cert_chain: chain }.encode_to_vec(),
                    },
                    prover: Some(prover),
                })
            }
            NodeAttestorConfig::K8sPsat {
                cluster,
                token_path,
            } => {
                let text = Zeroizing::new(std::fs::read_to_string(token_path).map_err(|e| {
                    NodeError::Evidence(format!(
                        "cannot read the service account token {}: {e}",
                        token_path.display()
                    ))
                })?);
                let token = text.trim();
                if token.is_empty() {
                    return Err(NodeError::Evidence(format!(
                        "the service account token {} is empty",
                        token_path.display()
                    )));
                }
                Ok(Self {
                    data: AttestationData {
                        r#type: config.name().to_owned(),
                        payload: K8sPsatAttestation {
                            cluster: cluster.clone(),
                            token: token.to_owned(),
                        }
                        .encode_to_vec(),
                    },
                    prover: None,
                })
            }
        }
    }
}

impl Prover {
    /// Signs the challenge followed by the SHA-256 of the leaf's DER, as
    /// the server expects.
    pub(crate) fn answer(&self, challenge: &[u8]) -> Result<Vec<u8>, NodeError> {
        let mut message = challenge.to_vec();
        message.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &self.leaf).as_ref());
        self.sign(&message)
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, NodeError> {
        match &self.key {
            NodeKey::Pkcs8(pair) => pair
                .sign(message)
                .map_err(|e| NodeError::Crypto(format!("signing the x509pop challenge: {e}"))),
            NodeKey::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &ring::rand::SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(|_| NodeError::Crypto("signing the x509pop challenge".into()))?;
                Ok(signature)
            }
        }
    }

    /// Checks that the key signs for the certificate's public key.
    fn check_matches(&self, path: &Path) -> Result<(), NodeError> {
        let probe = b"sigil x509pop key check";
        let signature = self.sign(probe)?;
        let leaf = rustls_pki_types::CertificateDer::from(self.leaf.as_slice());
        let cert = webpki::EndEntityCert::try_from(&leaf).map_err(|e| {
            NodeError::Evidence(format!("the certificate in {}: {e}", path.display()))
        })?;
        let verifies = webpki::ALL_VERIFICATION_ALGS
            .iter()
            .any(|alg| cert.verify_signature(*alg, probe, &signature).is_ok());
        if verifies {
            Ok(())
        } else {
            Err(NodeError::Evidence(format!(
                "private_key_path is not the key of the certificate in {}",
                path.display()
            )))
        }
    }
}

/// Reads the certificates of a PEM file.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, NodeError> {
    let bad = |e: &dyn fmt::Display| NodeError::Evidence(format!("{}: {e}", path.display()));
    let text = std::fs::read(path).map_err(|e| bad(&format!("cannot read: {e}")))?;
    let certs: Vec<Vec<u8>> = pem::parse_many(&text)
        .map_err(|e| bad(&e))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(bad(&"has no certificate"));
    }
    Ok(certs)
}

/// Reads a private key: PEM PKCS#8, SEC1 EC or PKCS#1 RSA.
fn read_key(path: &Path) -> Result<NodeKey, NodeError> {
    let bad = |e: &dyn fmt::Display| NodeError::Evidence(format!("{}: {e}", path.display()));
    let text = Zeroizing::new(std::fs::read(path).map_err(|e| bad(&format!("cannot read: {e}")))?);
    let block = pem::parse_many(text.as_slice())
        .map_err(|e| bad(&e))?
        .into_iter()
        .find(|p| p.tag().ends_with("PRIVATE KEY"))
        .ok_or_else(|| bad(&"has no private key"))?;
    let der = Zeroizing::new(block.contents().to_vec());
    match block.tag() {
        "PRIVATE KEY" => rcgen::KeyPair::try_from(der.as_slice())
            .map(NodeKey::Pkcs8)
            .map_err(|e| bad(&e)),
        "EC PRIVATE KEY" => {
            let pkcs8 = Zeroizing::new(
                sec1_to_pkcs8(&der)
                    .ok_or_else(|| bad(&"the EC key is not on P-256 or P-384, or is malformed"))?,
            );
            rcgen::KeyPair::try_from(pkcs8.as_slice())
                .map(NodeKey::Pkcs8)
                .map_err(|e| bad(&e))
        }
        "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der)
            .map(NodeKey::Rsa)
            .map_err(|e| bad(&e)),
        other => Err(bad(&format!("unsupported key type {other:?}"))),
    }
}

/// OID of id-ecPublicKey.
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// OID of P-256 (prime256v1).
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// OID of P-384 (secp384r1).
const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Wraps a SEC1 `ECPrivateKey` (which names its curve) in PKCS#8.
fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
    let has = |oid: &[u8]| sec1.windows(oid.len()).any(|w| w == oid);
    let curve = if has(P256) {
        P256
    } else if has(P384) {
        P384
    } else {
        return None;
    };
    let algorithm = der(0x30, &[EC_PUBLIC_KEY, curve].concat());
    let body = [&[0x02, 0x01, 0x00][..], &algorithm, &der(0x04, sec1)].concat();
    Some(der(0x30, &body))
}

/// A DER element with `tag` and `content`.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn node_cert(key: &rcgen::KeyPair) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["node1".to_owned()]).unwrap();
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.self_signed(key).unwrap().pem()
    }

    fn verify(evidence: &Evidence, challenge: &[u8]) -> bool {
        let prover = evidence.prover.as_ref().unwrap();
        let signature = prover.answer(challenge).unwrap();
        let cert = X509PopAttestation::decode(evidence.data.payload.as_slice()).unwrap();
        let leaf = rustls_pki_types::CertificateDer::from(cert.cert_chain[0].clone());
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let mut message = challenge.to_vec();
        message.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &leaf).as_ref());
        webpki::ALL_VERIFICATION_ALGS
            .iter()
            .any(|alg| ee.verify_signature(*alg, &message, &signature).is_ok())
    }

    /// Content and rest of the DER element at the start of `d`.
    fn split(d: &[u8]) -> (&[u8], &[u8]) {
        let (len, header) = if d[1] < 0x80 {
            (usize::from(d[1]), 2)
        } else {
            let n = usize::from(d[1] & 0x7f);
            (
                d[2..2 + n]
                    .iter()
                    .fold(0usize, |a, b| (a << 8) | usize::from(*b)),
                2 + n,
            )
        };
        (&d[header..header + len], &d[header + len..])
    }

    /// The ECPrivateKey inside a PKCS#8 key, with the curve parameters.
    fn pkcs8_to_sec1(pkcs8: &[u8], curve: &[u8]) -> Vec<u8> {
        let (info, _) = split(pkcs8);
        let (_, rest) = split(info);
        let (_, rest) = split(rest);
        let (ec_private_key, _) = split(rest);
        let (body, _) = split(ec_private_key);
        let version_len = 3;
        let (_, after_key) = split(&body[version_len..]);
        let key_len = body.len() - version_len - after_key.len();
        let head = &body[..version_len + key_len];
        // Drop any parameters already there, keep the public key.
        let tail = if after_key.first() == Some(&0xa0) {
            split(after_key).1
        } else {
            after_key
        };
        der(0x30, &[head, &der(0xa0, curve), tail].concat())
    }

    #[test]
    fn pkcs8_and_sec1_keys_answer_challenges() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = write(dir.path(), "node.pem", &node_cert(&key));
            let pkcs8 = write(dir.path(), "key.pem", &key.serialize_pem());
            let config = NodeAttestorConfig::X509Pop {
                certificate_path: cert.clone(),
                private_key_path: pkcs8,
                intermediates_path: None,
            };
            let evidence = Evidence::read(&config).unwrap();
            assert_eq!(evidence.data.r#type, "x509pop");
            assert!(verify(&evidence, &[7; 32]));

            // The same key in SEC1 form, naming its curve, as OpenSSL
            // writes it.
            let curve = if std::ptr::eq(alg, &rcgen::PKCS_ECDSA_P256_SHA256) {
                P256
            } else {
                P384
            };
            let sec1 = pkcs8_to_sec1(&key.serialize_der(), curve);
            let sec1_path = write(
                dir.path(),
                "sec1.pem",
                &pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1)),
            );
            let config = NodeAttestorConfig::X509Pop {
                certificate_path: cert,
                private_key_path: sec1_path,
                intermediates_path: None,
            };
            assert!(verify(&Evidence::read(&config).unwrap(), &[9; 32]));
        }
    }

    #[test]
    fn rsa_keys_in_pkcs8_and_pkcs1_answer_challenges() {
        // A throwaway key made for this test (ring cannot generate RSA keys).
        let pem_text = include_str!("testdata/rsa-2048-test-key.pem");
        let pkcs8 = pem::parse(pem_text).unwrap().into_contents();
        let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = write(dir.path(), "node.pem", &node_cert(&key));
        let (info, _) = split(&pkcs8);
        let (_, rest) = split(info);
        let (_, rest) = split(rest);
        let (pkcs1, _) = split(rest);
        let pkcs1_pem = pem::encode(&pem::Pem::new("RSA PRIVATE KEY", pkcs1.to_vec()));
        for (name, text) in [("pkcs8.pem", pem_text.to_owned()), ("pkcs1.pem", pkcs1_pem)] {
            let config = NodeAttestorConfig::X509Pop {
                certificate_path: cert.clone(),
                private_key_path: write(dir.path(), name, &text),
                intermediates_path: None,
            };
            assert!(
                verify(&Evidence::read(&config).unwrap(), &[3; 32]),
                "{name}"
            );
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let config = NodeAttestorConfig::X509Pop {
            certificate_path: write(dir.path(), "node.pem", &node_cert(&key)),
            private_key_path: write(dir.path(), "key.pem", &other.serialize_pem()),
            intermediates_path: None,
        };
        let error = Evidence::read(&config).unwrap_err().to_string();
        assert!(
            error.contains("private_key_path is not the key of the certificate in"),
            "{error}"
        );
    }

    #[test]
    fn the_token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeAttestorConfig::K8sPsat {
            cluster: "prod".into(),
            token_path: write(dir.path(), "token", "eyJ.a.b\n"),
        };
        let evidence = Evidence::read(&config).unwrap();
        assert!(!format!("{evidence:?}").contains("eyJ"));
        let payload = K8sPsatAttestation::decode(evidence.data.payload.as_slice()).unwrap();
        assert_eq!(
            (payload.cluster.as_str(), payload.token.as_str()),
            ("prod", "eyJ.a.b")
        );
        let missing = NodeAttestorConfig::K8sPsat {
            cluster: "prod".into(),
            token_path: dir.path().join("none"),
        };
        assert!(
            Evidence::read(&missing)
                .unwrap_err()
                .to_string()
                .contains("cannot read the service account token")
        );
    }
}
