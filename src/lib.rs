//! The core of Sigil, shared by `sigil-server` and `sigil-agent`.
//!
//! - [`spiffe_id`]: SPIFFE IDs and trust domains, parsed by the rules of the
//!   SPIFFE ID standard and of the strictest client libraries.
//! - [`selector`]: workload and node selectors (`type:value`).
//! - [`x509`]: the X.509-SVID leaf and signing-certificate profiles, for
//!   building certificates and for checking them, and PKCS#10 CSRs.
//! - [`bundle`]: X.509 trust bundles and their PEM and SPIFFE JSON forms.
//! - [`keys`]: private keys as secrets, and files that hold secrets.
//! - [`tls`]: rustls configuration that authenticates peers by X.509-SVID.
//! - [`transport`]: gRPC channels over Unix sockets and over rustls.
//! - [`proto`]: generated code of the SPIFFE Workload API and Sigil's APIs.
//!
//! Nothing in this crate logs or formats key material, join tokens or JWTs:
//! the types that hold them print only a placeholder.

pub mod bundle;
pub mod entry;
pub mod keys;
pub mod proto;
pub mod selector;
pub mod spiffe_id;
pub mod tls;
pub mod transport;
pub mod x509;

pub use entry::Entry;
pub use selector::{Selector, Selectors};
pub use spiffe_id::{SpiffeId, TrustDomain};
