//! Test stand-ins for `attest`, all real components: a swtpm process per test, an
//! in-test SPIFFE Workload API server (no SPIRE is installable here), rcgen certificates.
//! Nothing in here mocks the TPM.

pub mod certs;
pub mod error;
pub mod swtpm;
pub mod workload_api;

pub use certs::{pem, IssuedSvid, SvidSpec, TestCa};
pub use error::TestkitError;
pub use swtpm::{require_tool, Swtpm};
pub use workload_api::{SvidMaterial, WorkloadApiServer};
