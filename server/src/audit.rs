//! The audit log: one JSON object per line for every change made through
//! the admin API and every refused admin call.
//!
//! Each event has `time` (RFC 3339, UTC), `caller` (`{"uid": n}` for the
//! local socket, `{"spiffe_id": "…"}` for an admin workload over mTLS,
//! `{"address": "…"}` for a refused caller without a certificate),
//! `action` (`entry.create`, `agent.ban`, …), `ids` (the entries, agents or
//! trust domains concerned), `outcome` (`"ok"` or
//! `{"error": {"code": "NOT_FOUND", "message": "…"}}`) and, when there are
//! any, `details` that are not secret.
//!
//! Events go to a file (mode 0600, appended, one `write` per event, so a
//! line is in the file before the caller hears the answer) and to tracing
//! under the target `sigil::audit`.
//!
//! Handlers record events with [`record`] (or [`AuditLog::record`] for an
//! event built by hand):
//!
//! ```ignore
//! audit::record(&log, &caller, "authority.taint", [&authority_id], &result);
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Map, Value, json};
use sigil::SpiffeId;
use tonic::{Code, Status};

/// Who called the admin API; handlers find it in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A local user on the admin socket.
    Local {
        /// The caller's user ID, from the kernel.
        uid: u32,
    },
    /// An admin workload over mTLS.
    Admin {
        /// The SPIFFE ID of its X.509-SVID.
        spiffe_id: SpiffeId,
    },
}

/// Who made a call, as the audit log names it: a [`Caller`], or a refused
/// peer known only by what the transport tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// A local user.
    Uid(u32),
    /// The SPIFFE ID of the client certificate.
    SpiffeId(String),
    /// A peer without credentials, by its network address.
    Address(String),
    /// A peer nothing is known of.
    Unknown,
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed with this gRPC status.
    Error {
        /// The status code.
        code: Code,
        /// The status message.
        message: String,
    },
}

/// One audit event.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    time: SystemTime,
    principal: Principal,
    action: &'static str,
    ids: Vec<String>,
    outcome: Outcome,
    details: Map<String, Value>,
}

/// Where audit events go. Cheap to clone; clones share the file.
#[derive(Debug, Clone)]
pub(crate) struct AuditLog {
    file: Arc<Mutex<File>>,
}

// === impl Caller ===

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local { uid } => write!(f, "uid {uid}"),
            Self::Admin { spiffe_id } => write!(f, "{spiffe_id}"),
        }
    }
}

impl From<&Caller> for Principal {
    fn from(caller: &Caller) -> Self {
        match caller {
            Caller::Local { uid } => Self::Uid(*uid),
            Caller::Admin { spiffe_id } => Self::SpiffeId(spiffe_id.to_string()),
        }
    }
}

// === impl Principal ===

impl Principal {
    fn to_json(&self) -> Value {
        match self {
            Self::Uid(uid) => json!({ "uid": uid }),
            Self::SpiffeId(id) => json!({ "spiffe_id": id }),
            Self::Address(address) => json!({ "address": address }),
            Self::Unknown => Value::Null,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::SpiffeId(id) => f.write_str(id),
            Self::Address(address) => write!(f, "unauthenticated peer {address}"),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

// === impl Outcome ===

impl Outcome {
    /// The outcome of a call that returned `result`.
    pub(crate) fn of<T>(result: &Result<T, Status>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(status) => Self::from(status),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Ok => Value::from("ok"),
            Self::Error { code, message } => {
                json!({ "error": { "code": code_name(*code), "message": message } })
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error { code, .. } => code_name(*code),
        }
    }
}

impl From<&Status> for Outcome {
    fn from(status: &Status) -> Self {
        Self::Error {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// The canonical gRPC name of a status code, e.g. `PERMISSION_DENIED`.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// === impl Event ===

impl Event {
    /// An event of `action` by `principal`, now, that succeeded, concerning
    /// nothing yet.
    pub(crate) fn new(principal: impl Into<Principal>, action: &'static str) -> Self {
        Self {
            time: SystemTime::now(),
            principal: principal.into(),
            action,
            ids: Vec::new(),
            outcome: Outcome::Ok,
            details: Map::new(),
        }
    }

    /// Adds the IDs of what the action concerns.
    pub(crate) fn ids<I>(mut self, ids: I) -> Self
    where
        I: IntoIterator,
        I::Item: fmt::Display,
    {
        self.ids.extend(ids.into_iter().map(|id| id.to_string()));
        self
    }

    /// Sets the outcome.
    pub(crate) fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Adds a detail; never pass a secret.
    pub(crate) fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// Sets the time (tests).
    #[cfg(test)]
    fn at(mut self, time: SystemTime) -> Self {
        self.time = time;
        self
    }

    /// The event as one line of JSON, without the newline.
    pub(crate) fn to_json_line(&self) -> String {
        let mut object = Map::new();
        object.insert(
            "time".into(),
            humantime::format_rfc3339_millis(self.time)
                .to_string()
                .into(),
        );
        object.insert("caller".into(), self.principal.to_json());
        object.insert("action".into(), self.action.into());
        object.insert("ids".into(), self.ids.clone().into());
        object.insert("outcome".into(), self.outcome.to_json());
        if !self.details.is_empty() {
            object.insert("details".into(), Value::Object(self.details.clone()));
        }
        Value::Object(object).to_string()
    }
}

// === impl AuditLog ===

impl AuditLog {
    /// Appends to the file at `path`, created with mode 0600. An existing
    /// regular file that others could read is set to 0600; anything else
    /// (a pipe, a device) is written as it is.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = File::options()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let meta = file.metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Writes `event` to the file and to tracing. A failed write is logged;
    /// the action it describes has happened either way.
    pub(crate) fn record(&self, event: &Event) {
        let line = event.to_json_line();
        tracing::info!(
            target: "sigil::audit",
            action = event.action,
            caller = %event.principal,
            ids = %event.ids.join(","),
            outcome = event.outcome.label(),
            "{line}"
        );
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        // A writer that panicked mid-line cannot have left the file in a
        // state worse than a short write; keep appending.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = file.write_all(&bytes) {
            tracing::error!(error = %e, action = event.action, "writing the audit log failed");
        }
    }
}

/// Records that `caller` did `action` on `ids` with `result`.
pub(crate) fn record<T, I>(
    log: &AuditLog,
    caller: &Caller,
    action: &'static str,
    ids: I,
    result: &Result<T, Status>,
) where
    I: IntoIterator,
    I::Item: fmt::Display,
{
    log.record(
        &Event::new(caller, action)
            .ids(ids)
            .outcome(Outcome::of(result)),
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    fn at_noon() -> SystemTime {
        // 2024-05-01T12:00:00.250Z
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_714_564_800_250)
    }

    #[test]
    fn a_local_success_names_the_uid_and_the_ids() {
        let caller = Caller::Local { uid: 1001 };
        let event = Event::new(&caller, "entry.create")
            .ids(["e-1"])
            .detail("spiffe_id", "spiffe://example.org/web")
            .detail("revision", 1)
            .at(at_noon());
        let line = event.to_json_line();
        assert!(!line.contains('\n'));
        assert_eq!(
            parse(&line),
            json!({
                "time": "2024-05-01T12:00:00.250Z",
                "caller": {"uid": 1001},
                "action": "entry.create",
                "ids": ["e-1"],
                "outcome": "ok",
                "details": {"spiffe_id": "spiffe://example.org/web", "revision": 1},
            })
        );
    }

    #[test]
    fn a_failure_carries_the_canonical_code_and_message() {
        let caller = Caller::Admin {
            spiffe_id: "spiffe://example.org/ops".parse().unwrap(),
        };
        let result: Result<(), Status> = Err(Status::not_found("no agent spiffe://example.org/x"));
        let event = Event::new(&caller, "agent.ban")
            .ids(["spiffe://example.org/x"])
            .outcome(Outcome::of(&result))
            .at(at_noon());
        assert_eq!(
            parse(&event.to_json_line()),
            json!({
                "time": "2024-05-01T12:00:00.250Z",
                "caller": {"spiffe_id": "spiffe://example.org/ops"},
                "action": "agent.ban",
                "ids": ["spiffe://example.org/x"],
                "outcome": {"error": {
                    "code": "NOT_FOUND",
                    "message": "no agent spiffe://example.org/x",
                }},
            })
        );
    }

    #[test]
    fn refused_peers_are_named_by_what_is_known() {
        let anonymous = Event::new(Principal::Address("127.0.0.1:4000".into()), "access.denied");
        assert_eq!(
            parse(&anonymous.to_json_line())["caller"],
            json!({"address": "127.0.0.1:4000"})
        );
        let unknown = Event::new(Principal::Unknown, "access.denied");
        assert_eq!(parse(&unknown.to_json_line())["caller"], Value::Null);
    }

    #[test]
    fn every_code_has_its_canonical_name() {
        let names: Vec<_> = (0..=16).map(|n| code_name(Code::from_i32(n))).collect();
        assert_eq!(
            names,
            [
                "OK",
                "CANCELLED",
                "UNKNOWN",
                "INVALID_ARGUMENT",
                "DEADLINE_EXCEEDED",
                "NOT_FOUND",
                "ALREADY_EXISTS",
                "PERMISSION_DENIED",
                "RESOURCE_EXHAUSTED",
                "FAILED_PRECONDITION",
                "ABORTED",
                "OUT_OF_RANGE",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS",
                "UNAUTHENTICATED",
            ]
        );
    }

    #[test]
    fn the_file_is_private_and_appended_one_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "earlier\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

        let log = AuditLog::open(&path).unwrap();
        let caller = Caller::Local { uid: 0 };
        record(
            &log,
            &caller,
            "bundle.delete",
            ["partner.org"],
            &Ok::<_, Status>(()),
        );
        let again = log.clone();
        record(
            &again,
            &caller,
            "bundle.delete",
            ["partner.org"],
            &Err::<(), _>(Status::not_found("no bundle for trust domain partner.org")),
        );

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "earlier");
        assert_eq!(parse(lines[1])["outcome"], json!("ok"));
        assert_eq!(
            parse(lines[2])["outcome"]["error"]["code"],
            json!("NOT_FOUND")
        );
        assert_eq!(parse(lines[2])["ids"], json!(["partner.org"]));
    }

    #[test]
    fn a_new_file_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(&Event::new(&Caller::Local { uid: 0 }, "token.generate"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
