//! aws-lc-rs backend (the default).

use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::signature::KeyPair;
use aws_lc_rs::{digest, hmac, rand, signature};
use zeroize::Zeroizing;

use super::{Backend, Es256Signer, Es256Verifier, Hs256Key, KeyRejected, Sha256};

#[derive(Debug)]
pub struct AwsLc;

/// The aws-lc-rs backend.
pub static AWS_LC: &AwsLc = &AwsLc;

const NAME: &str = "aws-lc-rs";

struct Verifier(signature::ParsedPublicKey);

impl Es256Verifier for Verifier {
    fn verify(&self, message: &[u8], sig: &[u8; 64]) -> bool {
        self.0.verify_sig(message, sig).is_ok()
    }
}

struct Signer(signature::EcdsaKeyPair);

impl Es256Signer for Signer {
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], KeyRejected> {
        let sig = self
            .0
            .sign(&rand::SystemRandom::new(), message)
            .map_err(|_| KeyRejected {
                backend: NAME,
                why: "signing failed",
            })?;
        sig.as_ref().try_into().map_err(|_| KeyRejected {
            backend: NAME,
            why: "signature is not 64 bytes",
        })
    }
}

struct HmacKey(hmac::Key);

impl Hs256Key for HmacKey {
    fn verify(&self, message: &[u8], tag: &[u8; 32]) -> bool {
        hmac::verify(&self.0, message, tag).is_ok()
    }

    fn sign(&self, message: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.0, message);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

struct Digest(digest::Context);

impl Sha256 for Digest {
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn finish(self: Box<Self>) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Backend for AwsLc {
    fn name(&self) -> &'static str {
        NAME
    }

    fn es256_verifier(&self, point: &[u8; 65]) -> Result<Box<dyn Es256Verifier>, KeyRejected> {
        // Parsed once here: the point is validated at load, not on every verify.
        let key = signature::ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .map_err(|_| KeyRejected {
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
        let pair = signature::EcdsaKeyPair::from_private_key_and_public_key(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            d,
            point,
        )
        .map_err(|_| KeyRejected {
            backend: NAME,
            why: "private scalar does not match the public point",
        })?;
        Ok(Box::new(Signer(pair)))
    }

    fn hs256_key(&self, secret: &[u8]) -> Box<dyn Hs256Key> {
        Box::new(HmacKey(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    fn sha256(&self) -> Box<dyn Sha256> {
        Box::new(Digest(digest::Context::new(&digest::SHA256)))
    }

    fn sha256_oneshot(&self, data: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
        out
    }

    fn random(&self, out: &mut [u8]) -> Result<(), KeyRejected> {
        rand::fill(out).map_err(|_| KeyRejected {
            backend: NAME,
            why: "the system random generator failed",
        })
    }

    fn es256_generate(&self) -> Result<(Zeroizing<[u8; 32]>, [u8; 65]), KeyRejected> {
        let err = |why| KeyRejected { backend: NAME, why };
        let pair = signature::EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| err("key generation failed"))?;
        let d = pair
            .private_key()
            .as_be_bytes()
            .map_err(|_| err("private key export failed"))?;
        let mut scalar = Zeroizing::new([0u8; 32]);
        scalar.copy_from_slice(d.as_ref());
        let point: [u8; 65] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| err("public key is not an uncompressed point"))?;
        Ok((scalar, point))
    }
}
