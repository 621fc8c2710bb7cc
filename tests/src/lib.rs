//! Harness for twill's root-only integration tests, benchmarks and the `twill-lab` command.
//!
//! Everything here creates resources inside network namespaces it owns and removes them
//! on drop, so a failing test leaves nothing behind in the machine's root namespace.

pub mod bins;
pub mod cni;
pub mod containerd;
pub mod deploy;
pub mod etcd;
pub mod lab;
pub mod netns;
pub mod sh;
pub mod underlay;
