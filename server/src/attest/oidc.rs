//! OpenID Connect discovery of an issuer's signing keys: GET
//! `<issuer>/.well-known/openid-configuration`, check that the document
//! names that same issuer (OpenID Connect Discovery 1.0, section 4.3), then
//! GET its `jwks_uri`.
//!
//! Plain `http://` (an issuer on a private network, tests) and `https://`
//! with the system's CA certificates (`SSL_CERT_FILE`, else
//! `/etc/ssl/certs/ca-certificates.crt`) are supported.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// How long one HTTP request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest document accepted, in bytes.
const MAX_BODY: usize = 1 << 20;

/// The system CA file used when `SSL_CERT_FILE` is not set.
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Fetches the issuer's JWKS through its discovery document, whose
/// `issuer` must be `issuer` exactly.
pub(crate) async fn fetch_jwks(issuer: &str) -> Result<JwkSet, String> {
    let discovery_url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let document: serde_json::Value = serde_json::from_slice(&get(&discovery_url).await?)
        .map_err(|e| format!("{discovery_url}: not JSON: {e}"))?;
    match document.get("issuer").and_then(serde_json::Value::as_str) {
        Some(named) if named == issuer => {}
        Some(named) => {
            return Err(format!(
                "{discovery_url}: the document names issuer {named:?}, not {issuer:?}: its keys are not used"
            ));
        }
        None => {
            return Err(format!(
                "{discovery_url}: the document has no issuer: its keys are not used"
            ));
        }
    }
    let jwks_uri = document
        .get("jwks_uri")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("{discovery_url}: no jwks_uri"))?;
    let body = get(jwks_uri).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{jwks_uri}: not a JWKS: {e}"))
}

/// GETs `url` and returns the body of a 200 answer.
async fn get(url: &str) -> Result<Vec<u8>, String> {
    tokio::time::timeout(REQUEST_TIMEOUT, get_inner(url))
        .await
        .map_err(|_| format!("{url}: no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
}

async fn get_inner(url: &str) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url}: only http and https URLs are supported")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = if tls {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(https_config()?));
        let name =
            ServerName::try_from(host.clone()).map_err(|e| format!("{url}: host name: {e}"))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
    .map_err(|e| format!("{url}: {e}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("{url}: HTTP status {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the body: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

async fn send<T>(
    io: TokioIo<T>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "OIDC discovery connection ended");
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// A TLS client configuration trusting the system's CA certificates.
fn https_config() -> Result<rustls::ClientConfig, String> {
    let path = std::env::var("SSL_CERT_FILE").unwrap_or_else(|_| SYSTEM_CA_FILE.to_owned());
    let pem =
        std::fs::read(&path).map_err(|e| format!("reading the CA certificates {path}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for block in pem::parse_many(&pem).map_err(|e| format!("{path}: {e}"))? {
        if block.tag() == "CERTIFICATE" {
            // Certificates rustls cannot use are skipped, as TLS clients do.
            let _ = roots.add(rustls_pki_types::CertificateDer::from(
                block.into_contents(),
            ));
        }
    }
    rustls::ClientConfig::builder_with_provider(sigil::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}
