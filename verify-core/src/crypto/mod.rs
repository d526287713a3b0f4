//! Crypto behind one small provider trait, as rustls does it: the verifier knows no
//! crypto library. Two backends implement it — aws-lc-rs (default) and the pure-Rust
//! p256 + hmac + sha2 — and the test suite checks that they agree on every vector.

use std::fmt;

use zeroize::Zeroizing;

#[cfg(feature = "aws-lc")]
mod aws_lc;
#[cfg(feature = "rust-crypto")]
mod rust_crypto;

#[cfg(feature = "aws-lc")]
pub use aws_lc::AWS_LC;
#[cfg(feature = "rust-crypto")]
pub use rust_crypto::RUST_CRYPTO;

#[cfg(not(any(feature = "aws-lc", feature = "rust-crypto")))]
compile_error!("verify-core needs a crypto backend: enable feature `aws-lc` or `rust-crypto`");

/// A public or secret key the backend refused (not on the curve, wrong length, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key rejected by the {backend} backend: {why}")]
pub struct KeyRejected {
    pub backend: &'static str,
    pub why: &'static str,
}

/// A crypto backend. Keys are parsed once, at load time, into prepared objects.
pub trait Backend: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;
    /// `point` is the SEC1 uncompressed P-256 point `04 || x || y`.
    fn es256_verifier(&self, point: &[u8; 65]) -> Result<Box<dyn Es256Verifier>, KeyRejected>;
    /// `d` is the private scalar, `point` the matching public point.
    fn es256_signer(
        &self,
        d: &[u8; 32],
        point: &[u8; 65],
    ) -> Result<Box<dyn Es256Signer>, KeyRejected>;
    /// The caller enforces the RFC 7518 minimum of 32 bytes before calling.
    fn hs256_key(&self, secret: &[u8]) -> Box<dyn Hs256Key>;
    fn sha256(&self) -> Box<dyn Sha256>;
    fn sha256_oneshot(&self, data: &[u8]) -> [u8; 32];
    /// Fills `out` from the operating system's CSPRNG.
    fn random(&self, out: &mut [u8]) -> Result<(), KeyRejected>;
    /// A fresh P-256 key pair: private scalar and uncompressed public point.
    fn es256_generate(&self) -> Result<(Zeroizing<[u8; 32]>, [u8; 65]), KeyRejected>;
}

pub trait Es256Verifier: Send + Sync {
    /// `sig` is the raw JWS form `r || s`, never DER.
    fn verify(&self, message: &[u8], sig: &[u8; 64]) -> bool;
}

pub trait Es256Signer: Send + Sync {
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], KeyRejected>;
}

pub trait Hs256Key: Send + Sync {
    /// Constant-time comparison of the full 32-byte tag.
    fn verify(&self, message: &[u8], tag: &[u8; 32]) -> bool;
    fn sign(&self, message: &[u8]) -> [u8; 32];
}

pub trait Sha256: Send {
    fn update(&mut self, data: &[u8]);
    fn finish(self: Box<Self>) -> [u8; 32];
}

/// The backend used when nobody asks for another: aws-lc-rs when it is compiled in.
pub fn default_backend() -> &'static dyn Backend {
    #[cfg(feature = "aws-lc")]
    {
        AWS_LC
    }
    #[cfg(not(feature = "aws-lc"))]
    {
        RUST_CRYPTO
    }
}

/// Every backend compiled into this build, default first (tests iterate over it).
// Each push is behind its own feature, so there is no single `vec![]` to write.
#[allow(clippy::vec_init_then_push)]
pub fn all_backends() -> Vec<&'static dyn Backend> {
    let mut all: Vec<&'static dyn Backend> = Vec::new();
    #[cfg(feature = "aws-lc")]
    all.push(AWS_LC);
    #[cfg(feature = "rust-crypto")]
    all.push(RUST_CRYPTO);
    all
}

/// Looks a backend up by the name it reports (`aws-lc-rs`, `rust-crypto`).
pub fn backend_by_name(name: &str) -> Option<&'static dyn Backend> {
    all_backends().into_iter().find(|b| b.name() == name)
}
