//! Pure-Rust backend: p256 + hmac + sha2 (RustCrypto).

use hmac::{Hmac, Mac};
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha2::Digest as _;
use zeroize::Zeroizing;

use super::{Backend, Es256Signer, Es256Verifier, Hs256Key, KeyRejected, Sha256};

#[derive(Debug)]
pub struct RustCrypto;

/// The pure-Rust backend.
pub static RUST_CRYPTO: &RustCrypto = &RustCrypto;

const NAME: &str = "rust-crypto";

struct Verifier(VerifyingKey);

impl Es256Verifier for Verifier {
    fn verify(&self, message: &[u8], sig: &[u8; 64]) -> bool {
        // from_slice rejects r or s equal to zero or not below the group order.
        match Signature::from_slice(sig) {
            Ok(sig) => self.0.verify(message, &sig).is_ok(),
            Err(_) => false,
        }
    }
}

struct Signer(SigningKey);

impl Es256Signer for Signer {
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], KeyRejected> {
        let sig: Signature = self.0.sign(message);
        Ok(sig.to_bytes().into())
    }
}

/// The keyed HMAC state, cloned per use so the key schedule runs once.
struct HmacKey(Hmac<sha2::Sha256>);

impl Hs256Key for HmacKey {
    fn verify(&self, message: &[u8], tag: &[u8; 32]) -> bool {
        let mut mac = self.0.clone();
        mac.update(message);
        mac.verify_slice(tag).is_ok()
    }

    fn sign(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }
}

struct Digest(sha2::Sha256);

impl Sha256 for Digest {
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn finish(self: Box<Self>) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl Backend for RustCrypto {
    fn name(&self) -> &'static str {
        NAME
    }

    fn es256_verifier(&self, point: &[u8; 65]) -> Result<Box<dyn Es256Verifier>, KeyRejected> {
        let key = VerifyingKey::from_sec1_bytes(point).map_err(|_| KeyRejected {
            backend: NAME,
            why: "not a valid P-256 public point",
        })?;
        Ok(Box::new(Verifier(key)))
    }

    fn es256_signer(
        &self,
        d: &[u8; 32],
        point: &[u8; 65],
    ) -> Result<Box<dyn Es256Signer>, KeyRejected> {
        let key = SigningKey::from_slice(d).map_err(|_| KeyRejected {
            backend: NAME,
            why: "not a valid P-256 private scalar",
        })?;
        if key.verifying_key().to_encoded_point(false).as_bytes() != point.as_slice() {
            return Err(KeyRejected {
                backend: NAME,
                why: "private scalar does not match the public point",
            });
        }
        Ok(Box::new(Signer(key)))
    }

    fn hs256_key(&self, secret: &[u8]) -> Box<dyn Hs256Key> {
        // HMAC accepts keys of any length; the caller has enforced the minimum.
        match Hmac::<sha2::Sha256>::new_from_slice(secret) {
            Ok(mac) => Box::new(HmacKey(mac)),
            Err(_) => unreachable!("HMAC takes keys of every length"),
        }
    }

    fn sha256(&self) -> Box<dyn Sha256> {
        Box::new(Digest(sha2::Sha256::new()))
    }

    fn sha256_oneshot(&self, data: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(data).into()
    }

    fn random(&self, out: &mut [u8]) -> Result<(), KeyRejected> {
        getrandom::fill(out).map_err(|_| KeyRejected {
            backend: NAME,
            why: "the system random generator failed",
        })
    }

    fn es256_generate(&self) -> Result<(Zeroizing<[u8; 32]>, [u8; 65]), KeyRejected> {
        // A random 32-byte string is a valid scalar except with negligible probability;
        // retry rather than bias it.
        loop {
            let mut d = Zeroizing::new([0u8; 32]);
            self.random(d.as_mut())?;
            if let Ok(key) = SigningKey::from_slice(d.as_ref()) {
                let mut point = [0u8; 65];
                point.copy_from_slice(key.verifying_key().to_encoded_point(false).as_bytes());
                return Ok((d, point));
            }
        }
    }
}
