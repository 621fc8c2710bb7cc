//! Harness for twill's root-only integration tests (in `tests/`) and the benches (`bench/`).
//! The `twill-lab` tool is its own crate (`lab/`); the lab's tests here use it.
//!
//! Everything here creates resources inside network namespaces it owns and removes them
//! on drop, so a failing test leaves nothing behind in the machine's root namespace.

pub mod bins;
pub mod cni;
pub mod containerd;
pub mod deploy;
pub mod etcd;
/// The lab crate under its old path here, so tests written against `twill_tests::lab::…`
/// (the lab's CNI runtime, mostly) keep building; new code names `twill_lab` directly.
pub mod netns;
pub mod sh;
pub mod underlay;
