//! CNI spec versions: the supported set, parsing and ordering.

use super::error::{code, CniError};

/// Every spec version twill speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest supported version, used when nothing else is known.
pub const CURRENT_VERSION: &str = "1.1.0";

/// A parsed `major.minor.patch` version (a missing part counts as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub const V0_3_0: Version = Version(0, 3, 0);
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    /// Parses `"1.0.0"`; an empty string is `0.1.0` like libcni's decoder.
    pub fn parse(s: &str) -> Result<Version, CniError> {
        if s.is_empty() {
            return Ok(Version(0, 1, 0));
        }
        let bad = || CniError::decoding(format!("invalid version {s:?}"));
        let mut parts = s.split('.');
        let mut next = |required: bool| -> Result<u32, CniError> {
            match parts.next() {
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                    p.parse().map_err(|_| bad())
                }
                None if !required => Ok(0),
                _ => Err(bad()),
            }
        };
        let v = Version(next(true)?, next(false)?, next(false)?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

/// Code 1 unless `v` is exactly one of `supported` (libcni's reconciler matches strings).
pub fn check_supported(v: &str, supported: &[&str]) -> Result<(), CniError> {
    if supported.contains(&v) {
        return Ok(());
    }
    Err(
        CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
            format!("config is {:?}, plugin supports {:?}", v, supported),
        ),
    )
}

/// Whether results at `v` use the 0.1.0/0.2.0 `ip4`/`ip6` shape.
pub fn is_legacy_result(v: Version) -> bool {
    v < Version::V0_3_0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!(Version::parse("0.3.1").unwrap(), Version(0, 3, 1));
        assert_eq!(Version::parse("").unwrap(), Version(0, 1, 0));
        assert_eq!(Version::parse("1").unwrap(), Version(1, 0, 0));
        assert!(Version::parse("1.x").is_err());
        assert!(Version::parse("1.0.0.0").is_err());
        assert!(Version::parse("0.4.0").unwrap() < Version::V1_0_0);
        assert_eq!(Version::parse("banana").unwrap_err().code, 6);
        assert_eq!(
            check_supported("2.0.0", SUPPORTED_VERSIONS)
                .unwrap_err()
                .code,
            1
        );
        assert!(check_supported("0.3.1", SUPPORTED_VERSIONS).is_ok());
    }
}
