//! See the module list in `selfcheck` (mod.rs). Skeleton: filled in by its owner.
