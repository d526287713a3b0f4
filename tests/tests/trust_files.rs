//! Trust files refused the way ssh's StrictModes refuses them: a policy, JWKS or
//! directory above them that someone other than root or this user could change,
//! and an HS256 secret others can read. Each case through the library here; the
//! CLI runs the same cases (gateway/tests/cli.rs).

use capsule_tests::trust_attacks::{TrustAttack, TRUST_ATTACKS};
use capsule_tests::World;
use verify_core::ConfigError;

#[test]
fn every_unsafe_trust_file_is_refused_by_the_library_naming_the_file() {
    for attack in TRUST_ATTACKS {
        let w = World::new();
        w.policy(); // the untouched fixture loads
        let TrustAttack { name, apply, .. } = attack;
        let file = apply(&w);
        let err = verify_core::Policy::load(&w.policy_path(), w.backend)
            .expect_err(&format!("{name}: must be refused"));
        assert!(matches!(err, ConfigError::Unsafe { .. }), "{name}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains(attack.fix),
            "{name}: {msg}"
        );
    }
}
