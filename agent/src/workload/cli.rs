//! `sigil-agent api …`: a Workload API client for operators.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use sigil::bundle::cert_to_pem;
use sigil::keys::{PrivateKey, write_public_file, write_secret_file};
use sigil::proto::workload::{X509svid, X509svidRequest, X509svidResponse};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::client;

/// Arguments of `sigil-agent api fetch x509`.
#[derive(Debug, clap::Args)]
pub(crate) struct FetchX509Args {
    /// Path of the Workload API socket.
    #[arg(long, default_value = "/run/sigil/agent/api.sock")]
    pub(crate) socket_path: PathBuf,
    /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
    #[arg(long)]
    pub(crate) write: Option<PathBuf>,
    /// Give up after this many seconds without an answer.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub(crate) timeout: u64,
}

/// Arguments of `sigil-agent api watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// Path of the Workload API socket.
    #[arg(long, default_value = "/run/sigil/agent/api.sock")]
    pub(crate) socket_path: PathBuf,
}

/// Fetches the caller's X.509-SVIDs once and prints them.
pub(crate) async fn fetch_x509(args: FetchX509Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    let response = tokio::time::timeout(timeout, fetch_first(&args.socket_path))
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from the Workload API at {} within {}s",
                args.socket_path.display(),
                args.timeout
            )
        })??;
    let elapsed = started.elapsed();

    print!("{}", describe_x509(&response, elapsed)?);
    if let Some(dir) = &args.write {
        for line in write_x509(&response, dir)? {
            println!("{line}");
        }
    }
    Ok(())
}

/// Prints every update of the caller's X.509-SVIDs until interrupted.
pub(crate) async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let mut stream = open_x509_stream(&args.socket_path).await?;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            message = stream.message() => match message.map_err(status_error)? {
                Some(response) => println!("{}", summarize_x509(&response)?),
                None => bail!("the Workload API ended the stream"),
            },
        }
    }
}

async fn open_x509_stream(socket_path: &Path) -> anyhow::Result<Streaming<X509svidResponse>> {
    let mut client = client::connect(socket_path).await.map_err(|e| {
        anyhow!(
            "cannot connect to the Workload API at {}: {}",
            socket_path.display(),
            sigil::transport::error_chain(&e)
        )
    })?;
    let response = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status_error)?;
    Ok(response.into_inner())
}

/// The first message of a `FetchX509SVID` stream.
async fn fetch_first(socket_path: &Path) -> anyhow::Result<X509svidResponse> {
    let mut stream = open_x509_stream(socket_path).await?;
    match stream.message().await.map_err(status_error)? {
        Some(response) => Ok(response),
        None => bail!("the Workload API ended the stream without an answer"),
    }
}

/// A gRPC status as `<code>: <message>`, e.g.
/// `permission denied: no identity issued`.
fn status_error(status: Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// One certificate out of a concatenated DER list.
struct Cert<'a> {
    der: &'a [u8],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// Splits concatenated DER certificates.
fn split_certs<'a>(what: &str, mut der: &'a [u8]) -> anyhow::Result<Vec<Cert<'a>>> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| anyhow!("{what}: malformed certificate #{}: {e}", certs.len() + 1))?;
        let (this, _) = der.split_at(der.len() - rest.len());
        certs.push(Cert {
            der: this,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        });
        der = rest;
    }
    if certs.is_empty() {
        bail!("{what}: no certificate");
    }
    Ok(certs)
}

/// `2026-12-03 16:00:00 +00:00:00`.
fn format_time(t: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory]:[offset_minute]:[offset_second]"
    );
    t.format(format).unwrap_or_else(|_| t.to_string())
}

/// The SPIRE-like report of `api fetch x509`.
fn describe_x509(response: &X509svidResponse, elapsed: Duration) -> anyhow::Result<String> {
    let mut out = String::new();
    let n = response.svids.len();
    let _ = writeln!(out, "Received {n} svid after {elapsed:.1?}");
    for (i, svid) in response.svids.iter().enumerate() {
        let chain = split_certs(&format!("SVID #{i}"), &svid.x509_svid)?;
        let bundle = split_certs(&format!("bundle #{i}"), &svid.bundle)?;
        let _ = writeln!(out);
        let _ = writeln!(out, "SPIFFE ID:\t\t{}", svid.spiffe_id);
        if !svid.hint.is_empty() {
            let _ = writeln!(out, "Hint:\t\t\t{}", svid.hint);
        }
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| anyhow!("empty chain"))?;
        let _ = writeln!(out, "SVID Valid After:\t{}", format_time(leaf.not_before));
        let _ = writeln!(out, "SVID Valid Until:\t{}", format_time(leaf.not_after));
        for (j, cert) in intermediates.iter().enumerate() {
            let j = j + 1;
            let _ = writeln!(
                out,
                "Intermediate #{j} Valid After:\t{}",
                format_time(cert.not_before)
            );
            let _ = writeln!(
                out,
                "Intermediate #{j} Valid Until:\t{}",
                format_time(cert.not_after)
            );
        }
        for (j, cert) in bundle.iter().enumerate() {
            let j = j + 1;
            let _ = writeln!(
                out,
                "CA #{j} Valid After:\t{}",
                format_time(cert.not_before)
            );
            let _ = writeln!(out, "CA #{j} Valid Until:\t{}", format_time(cert.not_after));
        }
    }
    let _ = writeln!(out);
    Ok(out)
}

/// Writes `svid.N.pem`, `svid.N.key` and `bundle.N.pem` for each SVID into
/// `dir`, and returns what was written, one line per file.
fn write_x509(response: &X509svidResponse, dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut lines = Vec::new();
    for (i, svid) in response.svids.iter().enumerate() {
        let X509svid {
            x509_svid,
            x509_svid_key,
            bundle,
            ..
        } = svid;
        let chain = pem_of(&split_certs(&format!("SVID #{i}"), x509_svid)?);
        let bundle = pem_of(&split_certs(&format!("bundle #{i}"), bundle)?);
        let key = PrivateKey::from_pkcs8_der(x509_svid_key.clone())
            .with_context(|| format!("SVID #{i}: the private key"))?;

        let path = dir.join(format!("svid.{i}.pem"));
        lines.push(format!("Writing SVID #{i} to file {}.", path.display()));
        write_public_file(&path, chain.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;

        let path = dir.join(format!("svid.{i}.key"));
        lines.push(format!("Writing key #{i} to file {}.", path.display()));
        write_secret_file(&path, key.to_pem().as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;

        let path = dir.join(format!("bundle.{i}.pem"));
        lines.push(format!("Writing bundle #{i} to file {}.", path.display()));
        write_public_file(&path, bundle.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(lines)
}

fn pem_of(certs: &[Cert<'_>]) -> String {
    certs.iter().map(|cert| cert_to_pem(cert.der)).collect()
}

/// One line of `api watch`:
/// `Received 2 svids: spiffe://td/a, spiffe://td/b (first expires <RFC 3339>)`.
fn summarize_x509(response: &X509svidResponse) -> anyhow::Result<String> {
    let mut first_expiry: Option<OffsetDateTime> = None;
    for (i, svid) in response.svids.iter().enumerate() {
        let chain = split_certs(&format!("SVID #{i}"), &svid.x509_svid)?;
        let not_after = chain
            .first()
            .map(|leaf| leaf.not_after)
            .ok_or_else(|| anyhow!("SVID #{i}: empty chain"))?;
        first_expiry = Some(first_expiry.map_or(not_after, |t| t.min(not_after)));
    }
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    let n = ids.len();
    let expiry = first_expiry
        .unwrap_or_else(|| OffsetDateTime::from(SystemTime::UNIX_EPOCH))
        .format(&Rfc3339)
        .unwrap_or_default();
    Ok(format!(
        "Received {n} svid{}: {} (first expires {expiry})",
        if n == 1 { "" } else { "s" },
        ids.join(", "),
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::workload::tests::{Ca, own_selectors, start};

    #[tokio::test]
    async fn fetch_describes_and_writes_each_svid() {
        let ca = Ca::new();
        let snapshot = ca.snapshot(
            vec![
                ca.identity("/web", &own_selectors(), "internal"),
                ca.identity("/db", &own_selectors(), ""),
            ],
            1,
        );
        let server = start(snapshot).await;
        let response = fetch_first(&server.socket).await.unwrap();

        let text = describe_x509(&response, Duration::from_micros(3200)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Received 2 svid after 3.2ms");
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], "SPIFFE ID:\t\tspiffe://example.org/web");
        assert_eq!(lines[3], "Hint:\t\t\tinternal");
        assert!(
            lines[4].starts_with("SVID Valid After:\t20"),
            "{}",
            lines[4]
        );
        assert!(lines[4].ends_with(" +00:00:00"), "{}", lines[4]);
        assert!(
            lines[5].starts_with("SVID Valid Until:\t20"),
            "{}",
            lines[5]
        );
        assert!(
            lines[6].starts_with("CA #1 Valid After:\t20"),
            "{}",
            lines[6]
        );
        assert!(
            lines[7].starts_with("CA #1 Valid Until:\t20"),
            "{}",
            lines[7]
        );
        assert_eq!(lines[9], "SPIFFE ID:\t\tspiffe://example.org/db");

        let dir = tempfile::tempdir().unwrap();
        let written = write_x509(&response, dir.path()).unwrap();
        assert_eq!(
            written[0],
            format!(
                "Writing SVID #0 to file {}/svid.0.pem.",
                dir.path().display()
            )
        );
        assert_eq!(written.len(), 6);

        let chain = std::fs::read_to_string(dir.path().join("svid.1.pem")).unwrap();
        let leaf = rustls_pki_types::pem::PemObject::from_pem_slice(chain.as_bytes())
            .map(|der: rustls_pki_types::CertificateDer<'_>| der.to_vec())
            .unwrap();
        assert_eq!(
            sigil::x509::check_leaf(&leaf).unwrap().to_string(),
            "spiffe://example.org/db"
        );
        let key_path = dir.path().join("svid.1.key");
        let key = PrivateKey::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
        assert_eq!(key.der(), response.svids[1].x509_svid_key.as_slice());
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let bundle = std::fs::read_to_string(dir.path().join("bundle.0.pem")).unwrap();
        assert_eq!(bundle, cert_to_pem(ca.authority.cert()));
    }

    #[tokio::test]
    async fn a_caller_without_identity_gets_the_status_as_error() {
        let ca = Ca::new();
        let other = crate::workload::tests::uid_selectors(u32::MAX - 7);
        let server = start(ca.snapshot(vec![ca.identity("/web", &other, "")], 1)).await;
        let err = fetch_x509(FetchX509Args {
            socket_path: server.socket.clone(),
            write: None,
            timeout: 10,
        })
        .await
        .unwrap_err();
        assert_eq!(format!("{err:#}"), "permission denied: no identity issued");
    }

    #[tokio::test]
    async fn a_missing_socket_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("nothing.sock");
        let err = fetch_x509(FetchX509Args {
            socket_path: socket_path.clone(),
            write: None,
            timeout: 10,
        })
        .await
        .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "cannot connect to the Workload API at {}: transport error: No such file or directory (os error 2)",
                socket_path.display()
            )
        );
    }

    #[tokio::test]
    async fn watch_lines_name_every_id_and_the_first_expiry() {
        let ca = Ca::new();
        let snapshot = ca.snapshot(
            vec![
                ca.identity("/web", &own_selectors(), ""),
                ca.identity("/db", &own_selectors(), ""),
            ],
            1,
        );
        let server = start(snapshot).await;
        let response = fetch_first(&server.socket).await.unwrap();
        let line = summarize_x509(&response).unwrap();
        let expiry = response
            .svids
            .iter()
            .map(|s| sigil::x509::not_after(&s.x509_svid).unwrap())
            .min()
            .unwrap();
        assert_eq!(
            line,
            format!(
                "Received 2 svids: spiffe://example.org/web, spiffe://example.org/db (first expires {})",
                OffsetDateTime::from(expiry).format(&Rfc3339).unwrap()
            )
        );
    }
}
