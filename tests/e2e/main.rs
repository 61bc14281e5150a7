//! End-to-end tests: real `sigil-server` and `sigil-agent` processes, real
//! mTLS between them, real Unix sockets, and real SPIFFE clients as
//! workloads. Each test starts its own trust domain in a scratch directory.
//!
//! The multi-user tests run workloads under other uids and need root; CI
//! runs as root. The interoperability tests need the Go and Python client
//! programs built by `.ci/run` (`SIGIL_INTEROP_GO`, `SIGIL_INTEROP_PY`).

#![allow(
    unreachable_pub,
    reason = "helpers are shared between the modules of this one test binary"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed step of a test is a failed assertion"
)]
#![allow(
    clippy::disallowed_types,
    reason = "deadlines for real processes are wall-clock time, not tokio time"
)]

mod support;

mod admin_access;
mod agents;
mod aliases;
mod ca_rotation;
mod ca_rotation_mtls;
mod federation;
mod interop;
mod issuance;
mod mtls;
mod node_attestation;
mod operations;
mod postgres;
mod quickstart;
mod refusals;
mod registration;
mod restarts;
mod rotation;
mod taint;
mod upstream;
mod workloads;
mod x509pop_proofs;
