//! Code generated from `proto/` at build time.
//!
//! The Workload API (`proto/spiffe/workload.proto`) has no protobuf package,
//! as the SPIFFE standard requires: its service is `SpiffeWorkloadAPI` on the
//! wire. Convert these wire types into the validated types of this crate at
//! the edge of each API; business logic does not handle them.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]

/// The SPIFFE Workload API (service `SpiffeWorkloadAPI`).
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Sigil's own APIs.
pub mod sigil {
    /// Types shared by the agent and admin APIs.
    pub mod types {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.types.v1.rs"));
        }
    }
    /// The API between node agents and the server.
    pub mod agent {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.agent.v1.rs"));
        }
    }
    /// The server's administration API.
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/sigil.admin.v1.rs"));
        }
    }
}
