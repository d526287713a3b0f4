//! Artifact paths, SPIFFE IDs and runner patterns: whatever is accepted is canonical
//! (prints back to the same text) and an accepted path never climbs out of its root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verify_core::manifest::ArtifactPath;
use verify_core::{RunnerPattern, SpiffeId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = ArtifactPath::parse(text) {
        assert_eq!(p.as_str(), text);
        assert!(!text.starts_with('/'));
        assert!(text.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
    }
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text);
        assert!(RunnerPattern::parse(text).expect("an ID is an exact pattern").matches(&id));
    }
    let _ = RunnerPattern::parse(text);
});
