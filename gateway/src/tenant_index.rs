//! Tenant indexes given to an admission (`--index`): read, verified against the
//! policy's index keys, and the (tenant, version) pairs an admission used, which the
//! state records so that an index is never accepted below one seen before.

use std::io::Read;
use std::path::{Path, PathBuf};

use verify_core::index::MAX_INDEX_BYTES;
use verify_core::{Admitted, Decision, Policy, TenantIndex};

use crate::GatewayError;

fn usage(message: String) -> GatewayError {
    GatewayError::Usage(message)
}

/// Reads and verifies every `--index` file. One that does not verify (signature, a
/// key not in its tenant's `index.keys`, a malformed payload) is a usage error naming
/// the file; freshness is judged per capsule (`index_stale`).
pub fn load_all(paths: &[PathBuf], policy: &Policy) -> Result<Vec<TenantIndex>, GatewayError> {
    let mut out: Vec<TenantIndex> = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = read_index(path)?;
        let index = TenantIndex::verify(&bytes, policy)
            .map_err(|e| usage(format!("--index {}: {e}", path.display())))?;
        if out.iter().any(|i| i.tenant == index.tenant) {
            return Err(usage(format!(
                "--index {}: a second index for tenant `{}`",
                path.display(),
                index.tenant
            )));
        }
        out.push(index);
    }
    Ok(out)
}

fn read_index(path: &Path) -> Result<Vec<u8>, GatewayError> {
    let (file, _) = verify_core::digest::open_regular_path(path)
        .map_err(|e| GatewayError::io(path, e.into()))?;
    let mut bytes = Vec::new();
    file.take(MAX_INDEX_BYTES as u64 + 2)
        .read_to_end(&mut bytes)
        .map_err(|e| GatewayError::io(path, e))?;
    if bytes.len() > MAX_INDEX_BYTES + 1 {
        return Err(usage(format!(
            "--index {}: larger than {MAX_INDEX_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The (tenant, index version) pairs to record: each index under which a capsule of
/// its tenant was admitted (so it passed the freshness check).
pub fn versions_used(
    indexes: &[TenantIndex],
    results: &[Result<Admitted, Decision>],
) -> Vec<(String, u64)> {
    indexes
        .iter()
        .filter(|i| {
            results
                .iter()
                .flatten()
                .any(|a| a.manifest().tenant == i.tenant)
        })
        .map(|i| (i.tenant.clone(), i.version))
        .collect()
}
