//! Code shared by twill's CNI plugins, the `twilld` daemon and the tests.

pub mod cni;
pub mod ethtool;
pub mod fsutil;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod subnet_env;
