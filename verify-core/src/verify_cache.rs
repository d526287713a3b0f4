//! The verification cache: remembers that one exact JWS verified under one exact key
//! and what its manifest parsed as, so a capsule admitted again skips the ECDSA (or
//! HMAC) check and the JSON parse, and nothing else.
//!
//! Correct by construction:
//! - **What it holds** is [`SignedManifest`]: the kid and alg of the key that verified,
//!   the payload and the parsed [`Manifest`]. These are pure functions of (the JWS
//!   bytes, the key): the same bytes under the same key verify and parse the same way
//!   every time. Nothing that depends on the clock, the policy's rules, the state,
//!   the approvals or the files is in it, so [`crate::Verifier::verify`] still runs
//!   every one of those checks on a hit, after this returns (docs/manifest.md).
//! - **The key** is (SHA-256 of the JWS bytes, [`KeyFingerprint`] of the trusted key
//!   the trust store holds *now* for the header's kid, with the header's alg). The
//!   header rules, the kid lookup and the alg check run on every call to find that
//!   key; a JWS whose kid is no longer trusted, or whose kid now names another key,
//!   finds no entry and takes the uncached path, which gives the precise denial. A
//!   JWS with the same payload but another signature has another digest: a miss.
//! - **Only successes are cached**, and only after the uncached path
//!   ([`jws::verify`], [`Manifest::parse`]) produced them; a failure is recomputed
//!   every time, so a denial reads exactly as without the cache.
//! - **Invalidation**: the cache belongs to the [`crate::Policy`] (the loaded trust
//!   store). A reload builds a new `Policy`, whose cache starts empty, and the
//!   fingerprint keeps a key swapped under an unchanged kid from matching even in place.
//! - **Bounded**: at most `capacity` entries, evicted by `quick_cache`'s S3-FIFO
//!   (sharded locks, a read takes a shared lock: the rayon pool's threads do not
//!   serialise on one mutex). A well-kept, small crate (MIT, MSRV 1.71, three small
//!   dependencies) rather than a hand-written concurrent LRU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::b64;
use crate::decision::{Alg, Reason, Sha256Digest};
use crate::jws::{self, JwsFailure};
use crate::keys::{KeyFingerprint, KeyStore};
use crate::manifest::Manifest;

/// The default number of entries: with small capsules (a few KiB of JWS) a few
/// tens of MiB at most; the bound is `capacity` × about twice `max_jws_bytes`.
pub const DEFAULT_CAPACITY: usize = 4096;

/// What a JWS verified as: steps 3 to 9 of docs/manifest.md, which depend on the
/// JWS bytes and the key alone.
#[derive(Debug)]
pub struct SignedManifest {
    /// The kid and alg of the key that verified the signature.
    pub kid: String,
    pub alg: Alg,
    /// The decoded payload (the exact manifest bytes an approval names).
    pub payload: Vec<u8>,
    pub manifest: Arc<Manifest>,
}

/// (SHA-256 of the JWS, the verifying key): the two things the cached value is a
/// function of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CacheKey {
    jws: Sha256Digest,
    key: KeyFingerprint,
}

/// A bounded map from (JWS digest, key) to what it verified as; disabled with
/// capacity 0. Counts its hits and misses for the service's metrics.
pub struct VerifyCache {
    entries: Option<quick_cache::sync::Cache<CacheKey, Arc<SignedManifest>>>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for VerifyCache {
    fn default() -> VerifyCache {
        VerifyCache::new(DEFAULT_CAPACITY)
    }
}

impl VerifyCache {
    /// A cache of at most `capacity` entries; 0 verifies every JWS afresh.
    pub fn new(capacity: usize) -> VerifyCache {
        VerifyCache {
            entries: (capacity > 0).then(|| quick_cache::sync::Cache::new(capacity)),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held now (never more than [`VerifyCache::capacity`]).
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifications answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Verifications that checked the signature (the cache enabled or not).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// The signature check and the manifest parse of `jws` (whose SHA-256 is
    /// `digest`) under `keys`: from the cache when these bytes verified under the key
    /// `keys` holds now for their kid, else by [`jws::verify`] and [`Manifest::parse`]
    /// (a parse failure is `malformed_manifest` with the kid and alg known).
    pub fn verify(
        &self,
        jws: &[u8],
        digest: Sha256Digest,
        keys: &KeyStore,
        max_bytes: usize,
    ) -> Result<Arc<SignedManifest>, JwsFailure> {
        let Some(entries) = &self.entries else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return verify_uncached(jws, keys, max_bytes).map(Arc::new);
        };
        let key = cache_key(jws, digest, keys, max_bytes);
        if let Some(hit) = key.as_ref().and_then(|k| entries.get(k)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let signed = Arc::new(verify_uncached(jws, keys, max_bytes)?);
        // `key` is the key `jws::verify` just used: the header named it, the store holds it.
        if let Some(key) = key {
            entries.insert(key, signed.clone());
        }
        Ok(signed)
    }
}

/// Steps 2 to 6 of docs/manifest.md, the cheap ones, run on every call: the size,
/// three parts, the header's rules, a trusted key for its kid, of its alg. `None`
/// when any fails: the uncached path then says which.
fn cache_key(
    jws: &[u8],
    digest: Sha256Digest,
    keys: &KeyStore,
    max_bytes: usize,
) -> Option<CacheKey> {
    if jws.len() > max_bytes {
        return None;
    }
    let parts = jws::split(jws).ok()?;
    let header = jws::parse_header(&b64::decode(parts.header).ok()?).ok()?;
    let key = keys.get(&header.kid)?;
    (key.alg() == header.alg).then(|| CacheKey {
        jws: digest,
        key: key.fingerprint(),
    })
}

/// The signature, then the manifest: nothing in the payload is parsed before the
/// signature verifies.
fn verify_uncached(
    jws: &[u8],
    keys: &KeyStore,
    max_bytes: usize,
) -> Result<SignedManifest, JwsFailure> {
    let verified = jws::verify(jws, keys, max_bytes)?;
    let manifest = Manifest::parse(&verified.payload).map_err(|e| JwsFailure {
        reason: Reason::MalformedManifest,
        detail: e.to_string(),
        kid: Some(verified.kid.clone()),
        alg: Some(verified.alg),
    })?;
    Ok(SignedManifest {
        kid: verified.kid,
        alg: verified.alg,
        payload: verified.payload,
        manifest: Arc::new(manifest),
    })
}
