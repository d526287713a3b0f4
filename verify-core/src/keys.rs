//! Keys: RFC 7517 JWKs and the trust store (a JWKS). Every key carries its own `alg`,
//! and that alg alone decides how a token signed with the key is checked.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::b64;
use crate::crypto::{Backend, Es256Signer, Es256Verifier, Hs256Key, KeyRejected};
use crate::decision::Alg;
use crate::error::ConfigError;

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
pub const MIN_HS256_KEY_BYTES: usize = 32;

/// The JWK members the gateway understands; any other member is an error, so a key
/// never means something different here than where it was made.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    pub kty: String,
    pub kid: Option<String>,
    pub alg: Option<String>,
    #[serde(rename = "use")]
    pub use_: Option<String>,
    pub key_ops: Option<Vec<String>>,
    pub crv: Option<String>,
    pub x: Option<String>,
    pub y: Option<String>,
    pub d: Option<Zeroizing<String>>,
    pub k: Option<Zeroizing<String>>,
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secret members.
        f.debug_struct("Jwk")
            .field("kty", &self.kty)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwkSet {
    keys: Vec<Jwk>,
}

/// The key material of one JWK, checked for its alg.
pub enum KeyMaterial {
    Es256 {
        point: [u8; 65],
        d: Option<Zeroizing<[u8; 32]>>,
    },
    Hs256 {
        secret: Zeroizing<Vec<u8>>,
    },
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyMaterial::Es256 { d, .. } => write!(f, "Es256 {{ private: {} }}", d.is_some()),
            KeyMaterial::Hs256 { secret } => write!(f, "Hs256 {{ {} bytes }}", secret.len()),
        }
    }
}

/// A JWK with its kid and alg, validated.
#[derive(Debug)]
pub struct ParsedJwk {
    pub kid: String,
    pub alg: Alg,
    pub material: KeyMaterial,
}

/// Why a JWK was refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwkError {
    pub field: &'static str,
    pub message: String,
}

fn jwk_err(field: &'static str, message: impl Into<String>) -> JwkError {
    JwkError {
        field,
        message: message.into(),
    }
}

impl Jwk {
    /// Validates the key: kid and alg present, alg one of ours and matching kty/crv,
    /// coordinates and secrets of exactly the right length, usage (if stated) signing.
    pub fn parse(self) -> Result<ParsedJwk, JwkError> {
        let kid = self.kid.ok_or_else(|| jwk_err("kid", "required"))?;
        if kid.is_empty() || kid.len() > 256 || kid.chars().any(char::is_control) {
            return Err(jwk_err("kid", "must be 1 to 256 printable characters"));
        }
        let alg_name = self.alg.ok_or_else(|| jwk_err("alg", "required"))?;
        let alg = Alg::from_name(&alg_name).ok_or_else(|| {
            jwk_err(
                "alg",
                format!("`{alg_name}` is not allowed (ES256 or HS256 only)"),
            )
        })?;
        if let Some(use_) = &self.use_ {
            if use_ != "sig" {
                return Err(jwk_err("use", format!("`{use_}` is not `sig`")));
            }
        }
        if let Some(ops) = &self.key_ops {
            if ops
                .iter()
                .any(|op| !matches!(op.as_str(), "sign" | "verify"))
            {
                return Err(jwk_err("key_ops", "only `sign` and `verify` are allowed"));
            }
        }
        let material = match alg {
            Alg::Es256 => {
                if self.kty != "EC" {
                    return Err(jwk_err(
                        "kty",
                        format!("ES256 needs kty EC, not `{}`", self.kty),
                    ));
                }
                if self.crv.as_deref() != Some("P-256") {
                    return Err(jwk_err("crv", "ES256 needs crv P-256"));
                }
                if self.k.is_some() {
                    return Err(jwk_err("k", "not a member of an EC key"));
                }
                let x = coordinate(self.x.as_deref(), "x")?;
                let y = coordinate(self.y.as_deref(), "y")?;
                let mut point = [0u8; 65];
                point[0] = 0x04;
                point[1..33].copy_from_slice(&x);
                point[33..].copy_from_slice(&y);
                let d = match &self.d {
                    None => None,
                    Some(d) => Some(Zeroizing::new(
                        b64::decode_exact::<32>(d.as_bytes())
                            .ok()
                            .flatten()
                            .ok_or_else(|| jwk_err("d", "must be 32 bytes of base64url"))?,
                    )),
                };
                KeyMaterial::Es256 { point, d }
            }
            Alg::Hs256 => {
                if self.kty != "oct" {
                    return Err(jwk_err(
                        "kty",
                        format!("HS256 needs kty oct, not `{}`", self.kty),
                    ));
                }
                if self.crv.is_some() || self.x.is_some() || self.y.is_some() || self.d.is_some() {
                    return Err(jwk_err("kty", "an oct key has only `k`"));
                }
                let k = self.k.ok_or_else(|| jwk_err("k", "required"))?;
                let secret = Zeroizing::new(
                    b64::decode(k.as_bytes()).map_err(|_| jwk_err("k", "not base64url"))?,
                );
                if secret.len() < MIN_HS256_KEY_BYTES {
                    return Err(jwk_err(
                        "k",
                        format!(
                            "HS256 key is {} bytes; RFC 7518 requires at least {MIN_HS256_KEY_BYTES}",
                            secret.len()
                        ),
                    ));
                }
                KeyMaterial::Hs256 { secret }
            }
        };
        Ok(ParsedJwk { kid, alg, material })
    }
}

fn coordinate(value: Option<&str>, field: &'static str) -> Result<[u8; 32], JwkError> {
    let value = value.ok_or_else(|| jwk_err(field, "required"))?;
    b64::decode_exact::<32>(value.as_bytes())
        .ok()
        .flatten()
        .ok_or_else(|| jwk_err(field, "must be 32 bytes of base64url"))
}

/// A verifier prepared once at load time.
pub enum Verifier {
    Es256(Box<dyn Es256Verifier>),
    Hs256(Box<dyn Hs256Key>),
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verifier::Es256(_) => "Es256",
            Verifier::Hs256(_) => "Hs256",
        })
    }
}

/// Why a key was refused by the trust store or could not be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A trust store holds public keys: a leaked one must not be a signing key.
    #[error("private EC key in a trust store (remove `d`)")]
    PrivateInTrustStore,
    #[error("duplicate kid `{0}`")]
    DuplicateKid(String),
    /// The JWK's `alg` names another algorithm than its key material is for.
    #[error("alg {alg} does not fit the key material ({material})", alg = .alg.as_str(), material = .material.as_str())]
    AlgMaterialMismatch { alg: Alg, material: Alg },
    #[error("an EC public key cannot sign (the JWK has no `d`)")]
    PublicKeyCannotSign,
    /// The crypto backend refused the key or the operation.
    #[error(transparent)]
    Backend(#[from] KeyRejected),
}

/// One trusted key: its kid, its one alg, and a prepared verifier. Only a
/// [`KeyStore`] builds one, and it takes the alg from the key material, so the key
/// alone decides how a token signed with it is checked.
#[derive(Debug)]
pub struct TrustedKey {
    kid: String,
    alg: Alg,
    verifier: Verifier,
    snapshot: KeySnapshot,
    fingerprint: KeyFingerprint,
}

/// Names one trusted key exactly: the SHA-256 of its kid, alg and [`KeySnapshot`]
/// (an ES256 key's point, an HS256 key's fingerprint, never its secret). Two keys
/// with one kid but other material, or one material under another kid or alg, have
/// different fingerprints. The verification cache is keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; 32]);

impl KeyFingerprint {
    fn of(kid: &str, alg: Alg, snapshot: &KeySnapshot, backend: &dyn Backend) -> KeyFingerprint {
        let material: &[u8] = match snapshot {
            KeySnapshot::Es256 { point } => point,
            KeySnapshot::Hs256 { fingerprint } => fingerprint,
        };
        // Length-prefixed, so no two (kid, material) pairs share an encoding.
        let mut text = Vec::with_capacity(64 + kid.len() + material.len());
        text.extend_from_slice(b"capsule-gateway/trusted-key/v1\0");
        text.extend_from_slice(alg.as_str().as_bytes());
        text.push(0);
        text.extend_from_slice(&(kid.len() as u64).to_be_bytes());
        text.extend_from_slice(kid.as_bytes());
        text.extend_from_slice(material);
        KeyFingerprint(backend.sha256_oneshot(&text))
    }
}

/// What evidence may keep of a trusted key (a trust snapshot, so a bundle still
/// verifies after the key is rotated out): an ES256 key's public point; for an
/// HS256 key only a fingerprint, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySnapshot {
    Es256 {
        point: [u8; 65],
    },
    /// HMAC-SHA256 of [`HS256_FINGERPRINT_MESSAGE`] under the secret: it names the
    /// key without revealing it (a holder of the secret can recompute it).
    Hs256 {
        fingerprint: [u8; 32],
    },
}

/// The message an HS256 key's fingerprint is the tag of.
pub const HS256_FINGERPRINT_MESSAGE: &[u8] = b"capsule-gateway/hs256-key-fingerprint/v1";

impl TrustedKey {
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one alg tokens signed with this key may name.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// What evidence keeps of this key ([`KeySnapshot`]).
    pub fn snapshot(&self) -> &KeySnapshot {
        &self.snapshot
    }

    /// Names this exact key ([`KeyFingerprint`]).
    pub fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint
    }

    /// Prepares a verifier; the alg is the material's, and a JWK naming another is
    /// refused (`Jwk::parse` already matched them; a `ParsedJwk` built by hand may not).
    fn prepare(jwk: ParsedJwk, backend: &'static dyn Backend) -> Result<TrustedKey, KeyError> {
        let material = jwk.material.alg();
        if jwk.alg != material {
            return Err(KeyError::AlgMaterialMismatch {
                alg: jwk.alg,
                material,
            });
        }
        let (verifier, snapshot) = match &jwk.material {
            KeyMaterial::Es256 { d: Some(_), .. } => return Err(KeyError::PrivateInTrustStore),
            KeyMaterial::Es256 { point, d: None } => (
                Verifier::Es256(backend.es256_verifier(point)?),
                KeySnapshot::Es256 { point: *point },
            ),
            KeyMaterial::Hs256 { secret } => {
                let key = backend.hs256_key(secret);
                let fingerprint = key.sign(HS256_FINGERPRINT_MESSAGE);
                (Verifier::Hs256(key), KeySnapshot::Hs256 { fingerprint })
            }
        };
        let fingerprint = KeyFingerprint::of(&jwk.kid, material, &snapshot, backend);
        Ok(TrustedKey {
            kid: jwk.kid,
            alg: material,
            verifier,
            snapshot,
            fingerprint,
        })
    }
}

impl KeyMaterial {
    /// The alg this material is for: the key type decides it.
    pub fn alg(&self) -> Alg {
        match self {
            KeyMaterial::Es256 { .. } => Alg::Es256,
            KeyMaterial::Hs256 { .. } => Alg::Hs256,
        }
    }
}

/// The trust store: keys found only by `kid`.
#[derive(Debug, Default)]
pub struct KeyStore {
    keys: HashMap<String, TrustedKey>,
}

impl KeyStore {
    pub fn get(&self, kid: &str) -> Option<&TrustedKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Loads a JWKS file, a trust file by [`crate::trust_file`]'s rules; one that
    /// holds an HS256 secret must be readable by its owner only.
    pub fn load(path: &Path, backend: &'static dyn Backend) -> Result<KeyStore, ConfigError> {
        Ok(KeyStore::load_with_bytes(path, backend)?.0)
    }

    /// [`KeyStore::load`], also returning the exact bytes parsed (their digest is
    /// evidence of the trust store in force).
    pub fn load_with_bytes(
        path: &Path,
        backend: &'static dyn Backend,
    ) -> Result<(KeyStore, Vec<u8>), ConfigError> {
        let file = crate::trust_file::read(path)?;
        let store = KeyStore::from_jwks(&file.bytes, path, backend)?;
        if store.keys.values().any(|k| k.alg == Alg::Hs256) {
            file.require_private("it holds an HS256 secret (an `oct` key)")?;
        }
        Ok((store, file.bytes))
    }

    /// Parses a JWKS document; `origin` names it in errors.
    pub fn from_jwks(
        bytes: &[u8],
        origin: &Path,
        backend: &'static dyn Backend,
    ) -> Result<KeyStore, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let set: JwkSet = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            ConfigError::invalid(origin, e.path().to_string(), e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| ConfigError::invalid(origin, "-", e.to_string()))?;
        let mut store = KeyStore::default();
        for (i, jwk) in set.keys.into_iter().enumerate() {
            let parsed = jwk.parse().map_err(|e| {
                ConfigError::invalid(origin, format!("keys[{i}].{}", e.field), e.message)
            })?;
            store.insert(parsed, backend).map_err(|e| match e {
                KeyError::DuplicateKid(_) => {
                    ConfigError::invalid(origin, format!("keys[{i}].kid"), e.to_string())
                }
                e => ConfigError::invalid(origin, format!("keys[{i}]"), e.to_string()),
            })?;
        }
        Ok(store)
    }

    /// Adds a key from another source (for example a TPM-sealed HS256 key), its alg
    /// fixed by its material. A kid already in the store is refused.
    pub fn insert(
        &mut self,
        jwk: ParsedJwk,
        backend: &'static dyn Backend,
    ) -> Result<&TrustedKey, KeyError> {
        if self.keys.contains_key(&jwk.kid) {
            return Err(KeyError::DuplicateKid(jwk.kid));
        }
        let key = TrustedKey::prepare(jwk, backend)?;
        Ok(self.keys.entry(key.kid.clone()).or_insert(key))
    }
}

/// A signing key made from a private JWK (for `pack`).
pub enum SigningKey {
    Es256(Box<dyn Es256Signer>),
    Hs256(Box<dyn Hs256Key>),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SigningKey::Es256(_) => "SigningKey::Es256",
            SigningKey::Hs256(_) => "SigningKey::Hs256",
        })
    }
}

impl SigningKey {
    pub fn from_jwk(
        jwk: &ParsedJwk,
        backend: &'static dyn Backend,
    ) -> Result<SigningKey, KeyError> {
        match &jwk.material {
            KeyMaterial::Es256 { point, d: Some(d) } => {
                Ok(SigningKey::Es256(backend.es256_signer(d, point)?))
            }
            KeyMaterial::Es256 { d: None, .. } => Err(KeyError::PublicKeyCannotSign),
            KeyMaterial::Hs256 { secret } => Ok(SigningKey::Hs256(backend.hs256_key(secret))),
        }
    }

    /// The alg this key signs with.
    pub fn alg(&self) -> Alg {
        match self {
            SigningKey::Es256(_) => Alg::Es256,
            SigningKey::Hs256(_) => Alg::Hs256,
        }
    }

    pub fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            SigningKey::Es256(s) => Ok(s.sign(signing_input)?.to_vec()),
            SigningKey::Hs256(k) => Ok(k.sign(signing_input).to_vec()),
        }
    }
}

impl ParsedJwk {
    /// A fresh key for `alg` (ES256: P-256 pair; HS256: 32 random bytes).
    pub fn generate(
        kid: &str,
        alg: Alg,
        backend: &'static dyn Backend,
    ) -> Result<ParsedJwk, KeyError> {
        let material = match alg {
            Alg::Es256 => {
                let (d, point) = backend.es256_generate()?;
                KeyMaterial::Es256 { point, d: Some(d) }
            }
            Alg::Hs256 => {
                let mut secret = Zeroizing::new(vec![0u8; MIN_HS256_KEY_BYTES]);
                backend.random(&mut secret)?;
                KeyMaterial::Hs256 { secret }
            }
        };
        Ok(ParsedJwk {
            kid: kid.to_string(),
            alg,
            material,
        })
    }

    /// The JWK as JSON. `private` includes `d` for EC keys; an HS256 key is its
    /// secret, so `k` is always included for it.
    pub fn to_json(&self, private: bool) -> serde_json::Value {
        let mut jwk = serde_json::Map::new();
        let mut put = |k: &str, v: String| {
            jwk.insert(k.to_string(), serde_json::Value::String(v));
        };
        match &self.material {
            KeyMaterial::Es256 { point, d } => {
                put("kty", "EC".into());
                put("crv", "P-256".into());
                put("x", b64::encode(&point[1..33]));
                put("y", b64::encode(&point[33..]));
                if let (true, Some(d)) = (private, d) {
                    put("d", b64::encode(d.as_ref()));
                }
            }
            KeyMaterial::Hs256 { secret } => {
                put("kty", "oct".into());
                put("k", b64::encode(secret));
            }
        }
        put("kid", self.kid.clone());
        put("alg", self.alg.as_str().into());
        put("use", "sig".into());
        serde_json::Value::Object(jwk)
    }
}

/// Parses one JWK document (for example a private key file).
pub fn parse_jwk(bytes: &[u8]) -> Result<ParsedJwk, JwkError> {
    let jwk: Jwk =
        crate::json::from_slice_strict(bytes).map_err(|e| jwk_err("-", e.to_string()))?;
    jwk.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::all_backends;

    fn store(
        keys: &[serde_json::Value],
        backend: &'static dyn Backend,
    ) -> Result<KeyStore, ConfigError> {
        let jwks = serde_json::json!({ "keys": keys });
        KeyStore::from_jwks(
            jwks.to_string().as_bytes(),
            Path::new("t.jwks.json"),
            backend,
        )
    }

    fn field(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("not an Invalid error: {other}"),
        }
    }

    #[test]
    fn trust_store_rules() {
        for backend in all_backends() {
            let es = ParsedJwk::generate("es", Alg::Es256, backend).unwrap();
            let hs = ParsedJwk::generate("hs", Alg::Hs256, backend).unwrap();
            let ok = store(&[es.to_json(false), hs.to_json(true)], backend).unwrap();
            assert_eq!(ok.len(), 2);
            assert_eq!(ok.get("es").unwrap().alg(), Alg::Es256);

            // A private EC key does not belong in a trust store.
            assert_eq!(
                field(store(&[es.to_json(true)], backend).unwrap_err()),
                "keys[0]"
            );
            // Duplicate kids are ambiguous.
            let dup = store(&[es.to_json(false), es.to_json(false)], backend).unwrap_err();
            assert_eq!(field(dup), "keys[1].kid");
            // Usage must be signing; alg and kid are required; the alg must fit the key.
            let mut enc = es.to_json(false);
            enc["use"] = "enc".into();
            assert_eq!(field(store(&[enc], backend).unwrap_err()), "keys[0].use");
            let mut no_alg = es.to_json(false);
            no_alg.as_object_mut().unwrap().remove("alg");
            assert_eq!(field(store(&[no_alg], backend).unwrap_err()), "keys[0].alg");
            let mut wrong = hs.to_json(true);
            wrong["alg"] = "ES256".into();
            assert_eq!(field(store(&[wrong], backend).unwrap_err()), "keys[0].kty");
            // A point that is not on the curve is refused by the backend at load.
            let mut off_curve = es.to_json(false);
            off_curve["y"] = crate::b64::encode(&[1u8; 32]).into();
            assert_eq!(field(store(&[off_curve], backend).unwrap_err()), "keys[0]");
        }
    }

    /// The key decides the alg: a hand-made `ParsedJwk` whose alg is not its
    /// material's never becomes a trusted key, and a kid is trusted once.
    #[test]
    fn the_store_takes_the_alg_from_the_key_material() {
        let backend = crate::crypto::default_backend();
        let mut hs = ParsedJwk::generate("hs", Alg::Hs256, backend).unwrap();
        hs.alg = Alg::Es256;
        let mut store = KeyStore::default();
        assert_eq!(
            store.insert(hs, backend).unwrap_err(),
            KeyError::AlgMaterialMismatch {
                alg: Alg::Es256,
                material: Alg::Hs256
            }
        );
        assert!(store.is_empty());
        let hs = ParsedJwk::generate("hs", Alg::Hs256, backend).unwrap();
        assert_eq!(store.insert(hs, backend).unwrap().alg(), Alg::Hs256);
        let again = ParsedJwk::generate("hs", Alg::Hs256, backend).unwrap();
        assert_eq!(
            store.insert(again, backend).unwrap_err(),
            KeyError::DuplicateKid("hs".into())
        );
    }

    #[test]
    fn generated_keys_round_trip_through_json() {
        for alg in [Alg::Es256, Alg::Hs256] {
            let key = ParsedJwk::generate("k", alg, crate::crypto::default_backend()).unwrap();
            let again = parse_jwk(key.to_json(true).to_string().as_bytes()).unwrap();
            assert_eq!(again.to_json(true), key.to_json(true));
        }
    }
}
