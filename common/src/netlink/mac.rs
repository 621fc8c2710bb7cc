//! One MAC address type for VTEPs, leases (`VtepMAC`), bridges and the bridge plugin's `mac`
//! field: parsing, formatting and random locally administered addresses in one place.

use std::fmt;

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// A string that is not six `:`-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}")]
pub struct BadMac(pub String);

impl Mac {
    /// A random locally administered unicast MAC (flannel's `pkg/mac`). rand's thread RNG is
    /// seeded from the OS and panics rather than hand out zeros: a silent all-zero MAC would
    /// give every VTEP and bridge the same address.
    pub fn random() -> Mac {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }

    /// From a link's address attribute; None unless it is 6 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }

    /// Usable as a neighbour or FDB destination: unicast and not all zero.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mac(&self.0))
    }
}

impl std::str::FromStr for Mac {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Mac, BadMac> {
        let bad = || BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.trim().split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || p.len() > 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

/// `aa:bb:…` for any byte string (link addresses of other lengths included).
pub fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_random() {
        let m: Mac = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!("C6:D2:32:6F:8F:44".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:44:00",
            "c6:d2:32:6f:8f:zz",
            "c6::32:6f:8f:44",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let many: std::collections::HashSet<Mac> = (0..64).map(|_| Mac::random()).collect();
        assert_eq!(many.len(), 64, "random MACs repeat");
        assert!(many.iter().all(|m| m.0[0] & 0x03 == 0x02 && m.is_unicast()));
        assert!(!Mac([0x01, 0, 0x5e, 0, 0, 1]).is_unicast());
        assert!(!Mac([0; 6]).is_unicast());
        assert_eq!(Mac::from_bytes(&[1, 2, 3]), None);
        assert_eq!(format_mac(&[0, 0x1a, 0xff, 1, 2, 3]), "00:1a:ff:01:02:03");
    }
}
