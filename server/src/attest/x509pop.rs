//! The `x509pop` node attestor: proof of possession of a node certificate
//! issued by a CA the server trusts.
//!
//! The agent sends its certificate chain ([`X509PopAttestation`]). The
//! server verifies it to the configured CA bundle (validity times, a leaf
//! with digitalSignature key usage), then sends 32 random bytes. The agent
//! signs those bytes followed by the SHA-256 of its leaf's DER with the
//! leaf's key; a signature made for another stream (another nonce) or
//! another certificate fails.

use prost::Message as _;
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use sigil::proto::sigil::agent::v1::X509PopAttestation;
use sigil::spiffe_id::SERVER_PATH;
use sigil::{Selectors, SpiffeId, TrustDomain};
use tonic::Status;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{Attested, hex, push_selector};
use crate::config::X509PopConfig;

/// The attestor's name.
pub(crate) const NAME: &str = "x509pop";

/// Length of the challenge nonce, in bytes.
pub(crate) const NONCE_LEN: usize = 32;

/// Most certificates accepted in a chain.
const MAX_CHAIN: usize = 16;

/// Default template of agent ID paths.
pub(crate) const DEFAULT_PATH_TEMPLATE: &str = "/sigil/agent/x509pop/{fingerprint}";

/// The signature algorithms a challenge response may use.
static RESPONSE_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::ED25519,
];

/// The attestor, with its trusted CAs.
#[derive(Debug)]
pub(crate) struct X509Pop {
    td: TrustDomain,
    /// The trusted CA certificates.
    roots: Vec<CertificateDer<'static>>,
    /// The same as trust anchors, in the same order.
    anchors: Vec<TrustAnchor<'static>>,
    template: String,
    rng: SystemRandom,
}

/// A verified chain waiting for the proof of possession of its key.
#[derive(Debug)]
pub(crate) struct Challenge {
    nonce: [u8; NONCE_LEN],
    leaf: CertificateDer<'static>,
    attested: Attested,
}

/// What the agent signs: the nonce, then the SHA-256 of the leaf's DER.
pub(crate) fn signed_message(nonce: &[u8], leaf: &[u8]) -> Vec<u8> {
    let mut message = nonce.to_vec();
    message.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref());
    message
}

/// Lowercase hex SHA-1 of a DER certificate, as SPIRE names certificates.
pub(crate) fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

/// Checks an agent path template: `/`-rooted, with only the
/// `{fingerprint}` and `{subject_cn}` placeholders, making valid IDs.
pub(crate) fn check_template(td: &TrustDomain, template: &str) -> Result<(), String> {
    if !template.starts_with('/') {
        return Err("must start with `/`".into());
    }
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            return Err("has an unclosed `{`".into());
        };
        let name = &after[..end];
        if name != "fingerprint" && name != "subject_cn" {
            return Err(format!(
                "unknown placeholder {{{name}}}: use {{fingerprint}} or {{subject_cn}}"
            ));
        }
        rest = &after[end + 1..];
    }
    let sample = template
        .replace("{fingerprint}", "0123abcd")
        .replace("{subject_cn}", "node1");
    agent_id(td, &sample).map(|_| ())
}

fn agent_id(td: &TrustDomain, path: &str) -> Result<SpiffeId, String> {
    if path == SERVER_PATH || path.starts_with(&format!("{SERVER_PATH}/")) {
        return Err(format!("{path:?} is reserved for the server"));
    }
    td.id_with_path(path).map_err(|e| format!("{path:?}: {e}"))
}

impl X509Pop {
    /// The attestor of `config` in `td`. The CA bundle was read and checked
    /// with the configuration.
    pub(crate) fn new(td: TrustDomain, config: &X509PopConfig) -> Self {
        let mut roots = Vec::new();
        let mut anchors = Vec::new();
        for root in &config.ca_certs {
            // Configuration loading kept only certificates that make anchors.
            if let Ok(anchor) = webpki::anchor_from_trusted_cert(root) {
                anchors.push(anchor.to_owned());
                roots.push(root.clone());
            }
        }
        Self {
            td,
            roots,
            anchors,
            template: config.agent_path_template.clone(),
            rng: SystemRandom::new(),
        }
    }

    /// Verifies the chain in `payload` and makes the challenge.
    pub(crate) fn begin(&self, payload: &[u8]) -> Result<Challenge, Status> {
        let evidence = X509PopAttestation::decode(payload).map_err(|e| {
            Status::invalid_argument(format!(
                "params.data.payload: not an X509PopAttestation: {e}"
            ))
        })?;
        self.begin_at(evidence, UnixTime::now())
    }

    /// [`Self::begin`] at a given time.
    pub(crate) fn begin_at(
        &self,
        evidence: X509PopAttestation,
        now: UnixTime,
    ) -> Result<Challenge, Status> {
        let mut chain: Vec<CertificateDer<'static>> = evidence
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        if chain.is_empty() {
            return Err(Status::invalid_argument(
                "params.data.payload: cert_chain is empty",
            ));
        }
        if chain.len() > MAX_CHAIN {
            return Err(Status::invalid_argument(format!(
                "params.data.payload: cert_chain has more than {MAX_CHAIN} certificates"
            )));
        }
        let leaf = chain.remove(0);
        let attested = self.verify(&leaf, &chain, now)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| crate::api::internal("making the x509pop challenge", "no randomness"))?;
        Ok(Challenge {
            nonce,
            leaf,
            attested,
        })
    }

    fn verify(
        &self,
        leaf: &CertificateDer<'static>,
        intermediates: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> Result<Attested, Status> {
        let denied =
            |what: String| Status::permission_denied(format!("params.data.payload: {what}"));
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| {
            Status::invalid_argument(format!("params.data.payload: cert_chain[0]: {e}"))
        })?;
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = cert.validity();
        if validity.not_after.timestamp() < secs {
            return Err(denied(format!(
                "cert_chain[0]: the certificate expired at {}",
                validity.not_after
            )));
        }
        if validity.not_before.timestamp() > secs {
            return Err(denied(format!(
                "cert_chain[0]: the certificate is not valid before {}",
                validity.not_before
            )));
        }
        match cert.key_usage() {
            Ok(Some(ku)) if ku.value.digital_signature() => {}
            Ok(_) => {
                return Err(denied(
                    "cert_chain[0]: the certificate lacks the digitalSignature key usage".into(),
                ));
            }
            Err(e) => return Err(denied(format!("cert_chain[0]: key usage: {e}"))),
        }

        let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
            Status::invalid_argument(format!("params.data.payload: cert_chain[0]: {e}"))
        })?;
        let path = end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| {
                denied(format!(
                    "the certificate chain does not verify against the x509pop CA bundle: {e}"
                ))
            })?;

        let mut selectors = Selectors::new();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        if let Some(cn) = &cn {
            push_selector(&mut selectors, NAME, &format!("subject:cn:{cn}"));
        }
        for ca in path.intermediate_certificates() {
            push_selector(
                &mut selectors,
                NAME,
                &format!("ca:fingerprint:{}", fingerprint(ca.der().as_ref())),
            );
        }
        let anchor = path.anchor();
        if let Some(root) = self
            .anchors
            .iter()
            .position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .and_then(|i| self.roots.get(i))
        {
            push_selector(
                &mut selectors,
                NAME,
                &format!("ca:fingerprint:{}", fingerprint(root)),
            );
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    push_selector(&mut selectors, NAME, &format!("san:dns:{dns}"));
                }
            }
        }
        push_selector(
            &mut selectors,
            NAME,
            &format!("serialnumber:{}", cert.serial.to_str_radix(16)),
        );

        let leaf_fingerprint = fingerprint(leaf);
        let mut path_text = self.template.replace("{fingerprint}", &leaf_fingerprint);
        if path_text.contains("{subject_cn}") {
            let cn = cn.ok_or_else(|| {
                denied("cert_chain[0]: agent_path_template needs a subject CN, and the certificate has none".into())
            })?;
            path_text = path_text.replace("{subject_cn}", &cn);
        }
        let agent_id = agent_id(&self.td, &path_text).map_err(|e| {
            denied(format!(
                "the agent ID made by agent_path_template is not valid: {e}"
            ))
        })?;
        Ok(Attested {
            agent_id,
            selectors,
            attestor: NAME,
            evidence: format!("x509pop.fingerprint={leaf_fingerprint}"),
            used_token: None,
        })
    }
}

impl Challenge {
    /// The bytes to send to the agent.
    pub(crate) fn nonce(&self) -> &[u8] {
        &self.nonce
    }

    /// Checks the agent's answer: a signature by the leaf's key over
    /// [`signed_message`].
    pub(crate) fn verify(self, signature: &[u8]) -> Result<Attested, Status> {
        let refused = || {
            Status::permission_denied(
                "challenge_response: the signature does not verify with the key of the node certificate",
            )
        };
        let end_entity = webpki::EndEntityCert::try_from(&self.leaf).map_err(|_| refused())?;
        let message = signed_message(&self.nonce, &self.leaf);
        if RESPONSE_ALGS.iter().any(|alg| {
            end_entity
                .verify_signature(*alg, &message, signature)
                .is_ok()
        }) {
            Ok(self.attested)
        } else {
            Err(refused())
        }
    }
}

#[cfg(test)]
mod tests;
