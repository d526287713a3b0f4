//! The OCI documents `publish` writes and `agent` reads: image manifests (a capsule,
//! an evidence export), the referrers index, and what a capsule manifest's layers
//! mean. Only the subset of the image spec these artifacts use, tolerant of members
//! other tools add, so capsules published by other OCI tools (oras, skopeo) read too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use verify_core::Sha256Digest;

use super::OciError;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CAPSULE_ARTIFACT_TYPE: &str = "application/vnd.capsule-gateway.capsule.v1";
pub const EVIDENCE_ARTIFACT_TYPE: &str = "application/vnd.capsule-gateway.evidence.v1";
/// A tenant index (one layer, the compact JWS, titled [`INDEX_TITLE`]), at tag `index`.
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.capsule-gateway.tenant-index.v1";
pub const INDEX_TITLE: &str = "index.jws";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty config's bytes (`{}`), as the image spec defines them.
pub const EMPTY_CONFIG: &[u8] = b"{}";
pub const JOSE_MEDIA_TYPE: &str = "application/jose";
pub const OCTET_MEDIA_TYPE: &str = "application/octet-stream";
pub const TITLE: &str = "org.opencontainers.image.title";
pub const ANN_CAPSULE_ID: &str = "dev.capsule-gateway.capsule.id";
pub const ANN_VERSION: &str = "dev.capsule-gateway.capsule.version";
pub const ANN_TENANT: &str = "dev.capsule-gateway.capsule.tenant";
pub const ANN_RUN_ID: &str = "dev.capsule-gateway.run.id";
pub const ANN_RUNNER: &str = "dev.capsule-gateway.runner";
pub const ANN_EGRESS: &str = "dev.capsule-gateway.egress";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Sha256Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    /// The descriptor's digest: only `sha256:<64 lowercase hex>` is read (the store
    /// is sha256-addressed; anything else is refused, not guessed).
    pub fn sha256(&self) -> Result<Sha256Digest, OciError> {
        Sha256Digest::from_prefixed(&self.digest).ok_or_else(|| OciError::Malformed {
            what: format!("descriptor `{}`", self.digest),
            why: "not a sha256:<hex> digest".into(),
        })
    }

    pub fn title(&self) -> Option<&str> {
        self.annotations.get(TITLE).map(String::as_str)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// An artifact manifest: the empty config and `layers`.
    pub fn artifact(
        artifact_type: &str,
        layers: Vec<Descriptor>,
        annotations: BTreeMap<String, String>,
    ) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            artifact_type: Some(artifact_type.into()),
            config: empty_config(),
            layers,
            subject: None,
            annotations,
        }
    }

    /// The artifact type: `artifactType`, else the config's media type (image spec
    /// 1.1's rule for artifacts without the field).
    pub fn kind(&self) -> &str {
        self.artifact_type
            .as_deref()
            .unwrap_or(&self.config.media_type)
    }
}

/// The referrers index (OCI 1.1 referrers API, or the `sha256-<hex>` fallback tag).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl ImageIndex {
    pub fn empty() -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(INDEX_MEDIA_TYPE.into()),
            manifests: Vec::new(),
        }
    }
}

pub fn empty_config() -> Descriptor {
    Descriptor::new(
        EMPTY_MEDIA_TYPE,
        crate::oci::client::sha256(EMPTY_CONFIG),
        EMPTY_CONFIG.len() as u64,
    )
}

/// The `sha256-<hex>` tag the referrers fallback keeps for `subject`.
pub fn referrers_tag(subject: &Sha256Digest) -> String {
    format!("sha256-{}", subject.to_hex())
}

/// A capsule manifest's layers, by what the agent does with them.
#[derive(Debug, Clone)]
pub struct CapsuleLayers {
    /// `capsule.jws`.
    pub jws: Descriptor,
    /// `approvals/<name>.jws`, with `<name>.jws`.
    pub approvals: Vec<(String, Descriptor)>,
    /// Everything else (`files/...`): artifacts, resolved by digest from the store.
    pub files: Vec<Descriptor>,
}

/// Reads the capsule layout out of a manifest's layer titles. Titles decide only
/// where a blob goes: what the blobs are worth is decided by verification (the JWS
/// signature names every artifact's digest).
pub fn capsule_layers(m: &ImageManifest, what: &str) -> Result<CapsuleLayers, OciError> {
    let malformed = |why: String| OciError::Malformed {
        what: what.to_string(),
        why,
    };
    if m.kind() != CAPSULE_ARTIFACT_TYPE {
        return Err(malformed(format!(
            "artifact type `{}` is not a capsule",
            m.kind()
        )));
    }
    let mut jws = None;
    let mut approvals = Vec::new();
    let mut files = Vec::new();
    for layer in &m.layers {
        layer.sha256()?;
        let title = layer
            .title()
            .ok_or_else(|| malformed(format!("layer {} has no title", layer.digest)))?;
        if title == verify_core::verify::JWS_FILE {
            if jws.replace(layer.clone()).is_some() {
                return Err(malformed("two capsule.jws layers".into()));
            }
        } else if let Some(name) = title.strip_prefix("approvals/") {
            if name.contains('/') || !name.ends_with(".jws") || name.starts_with('.') {
                return Err(malformed(format!("approval layer title `{title}`")));
            }
            approvals.push((name.to_string(), layer.clone()));
        } else if title.starts_with("files/") {
            files.push(layer.clone());
        } else {
            return Err(malformed(format!(
                "layer title `{title}` is not part of a capsule"
            )));
        }
    }
    let jws = jws.ok_or_else(|| malformed("no capsule.jws layer".into()))?;
    Ok(CapsuleLayers {
        jws,
        approvals,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(title: &str, byte: u8) -> Descriptor {
        let mut d = Descriptor::new(OCTET_MEDIA_TYPE, Sha256Digest([byte; 32]), 1);
        d.annotations.insert(TITLE.into(), title.into());
        d
    }

    #[test]
    fn capsule_layers_are_read_by_title_and_strays_are_refused() {
        let m = ImageManifest::artifact(
            CAPSULE_ARTIFACT_TYPE,
            vec![
                layer("capsule.jws", 1),
                layer("approvals/a.jws", 2),
                layer("files/run.sh", 3),
            ],
            BTreeMap::new(),
        );
        let l = capsule_layers(&m, "t").expect("layers");
        assert_eq!(l.jws.digest, Sha256Digest([1; 32]).to_string());
        assert_eq!(l.approvals[0].0, "a.jws");
        assert_eq!(l.files.len(), 1);
        for bad in ["../x", "approvals/../a.jws", "approvals/a.txt", "other"] {
            let mut m = m.clone();
            m.layers.push(layer(bad, 9));
            assert!(capsule_layers(&m, "t").is_err(), "{bad}");
        }
        let mut m2 = m.clone();
        m2.artifact_type = Some(EVIDENCE_ARTIFACT_TYPE.into());
        assert!(capsule_layers(&m2, "t").is_err());
        let mut m3 = m.clone();
        m3.layers[0].digest = "sha512:00".into();
        assert!(capsule_layers(&m3, "t").is_err());
    }

    #[test]
    fn the_empty_config_is_the_specs() {
        assert_eq!(
            empty_config().digest,
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
