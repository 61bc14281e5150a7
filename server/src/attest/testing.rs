//! Test material for the node attestors: node CAs and certificates made
//! with rcgen, and Kubernetes-like service account tokens.

use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls_pki_types::CertificateDer;

/// A CA that issues node certificates.
pub(crate) struct NodeCa {
    pub(crate) params: CertificateParams,
    pub(crate) key: KeyPair,
    pub(crate) cert: CertificateDer<'static>,
}

/// A node certificate and its key.
pub(crate) struct NodeCert {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: KeyPair,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl NodeCa {
    /// A self-signed root.
    pub(crate) fn root(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(name);
        let cert = params.self_signed(&key).unwrap().der().clone();
        Self { params, key, cert }
    }

    /// An intermediate CA signed by this one.
    pub(crate) fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(name);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap().der().clone();
        Self { params, key, cert }
    }

    /// A node certificate with CN `cn`, DNS SAN `<cn>.nodes.test`, valid
    /// from `not_before` to `not_after`, with the given key usages.
    pub(crate) fn issue_with(
        &self,
        cn: &str,
        usages: Vec<KeyUsagePurpose>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> NodeCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![format!("{cn}.nodes.test")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = usages;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x1a, 0x2b, 0x3c]));
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap().der().clone();
        NodeCert { cert, key }
    }

    /// A node certificate valid for a day, for digital signatures.
    pub(crate) fn issue(&self, cn: &str) -> NodeCert {
        let now = SystemTime::now();
        self.issue_with(
            cn,
            vec![KeyUsagePurpose::DigitalSignature],
            now - Duration::from_secs(60),
            now + Duration::from_secs(86400),
        )
    }

    /// The PEM of this CA's certificate.
    pub(crate) fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.cert.to_vec()))
    }
}

impl NodeCert {
    /// Signs `message` with the node key (ECDSA P-256, SHA-256).
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        sign_p256(&self.key.serialize_der(), message)
    }
}

/// Signs with a PKCS#8 P-256 key.
pub(crate) fn sign_p256(pkcs8: &[u8], message: &[u8]) -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).unwrap();
    pair.sign(&rng, message).unwrap().as_ref().to_vec()
}

/// A token issuer's key pair (ES256) and its JWK.
pub(crate) struct TokenIssuer {
    pkcs8: Vec<u8>,
    pub(crate) kid: String,
}

impl TokenIssuer {
    /// A fresh key named `kid`.
    pub(crate) fn new(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        Self {
            pkcs8,
            kid: kid.to_owned(),
        }
    }

    /// The public key as a JWK.
    pub(crate) fn jwk(&self) -> serde_json::Value {
        use base64::Engine as _;
        let rng = ring::rand::SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.pkcs8, &rng).unwrap();
        let point = pair.public_key().as_ref();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
            "x": b64.encode(&point[1..33]),
            "y": b64.encode(&point[33..65]),
        })
    }

    /// A JWKS with this key.
    pub(crate) fn jwks(&self) -> String {
        serde_json::json!({ "keys": [self.jwk()] }).to_string()
    }

    /// Signs `claims`.
    pub(crate) fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

/// Now, in seconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    crate::clock::now_unix()
}

/// The claims of a projected service account token of pod `pod` (uid
/// `pod_uid`) on node `node-1` (uid `node_uid`), for `audience`.
pub(crate) fn psat_claims(
    issuer: &str,
    audience: &str,
    pod: &str,
    node_uid: &str,
) -> serde_json::Value {
    serde_json::json!({
        "iss": issuer,
        "aud": [audience],
        "sub": "system:serviceaccount:sigil:sigil-agent",
        "iat": now(),
        "nbf": now(),
        "exp": now() + 3600,
        "kubernetes.io": {
            "namespace": "sigil",
            "serviceaccount": { "name": "sigil-agent", "uid": "sa-uid-1" },
            "pod": { "name": pod, "uid": format!("{pod}-uid") },
            "node": { "name": "node-1", "uid": node_uid },
        },
    })
}
