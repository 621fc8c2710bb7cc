//! Readiness as one value: which parts of the node are not in place yet, and why.
//!
//! The node is Ready (conflist written, `/readyz` 200) only when every [`Part`] is in place.
//! Each part keeps its own reason, so `/readyz` says what is missing instead of a bare 503, and
//! the conflist condition and the readiness condition cannot drift apart (they used to be two
//! copies of a five-bool expression).

use std::collections::BTreeMap;
use std::fmt;

/// What must be in place, in the order the daemon sets things up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Lease,
    Device,
    Peers,
    Rules,
    IpForward,
    SubnetEnv,
    Conflist,
}

impl Part {
    pub const ALL: [Part; 7] = [
        Part::Lease,
        Part::Device,
        Part::Peers,
        Part::Rules,
        Part::IpForward,
        Part::SubnetEnv,
        Part::Conflist,
    ];

    fn name(self) -> &'static str {
        match self {
            Part::Lease => "lease",
            Part::Device => "device",
            Part::Peers => "peers",
            Part::Rules => "rules",
            Part::IpForward => "ip_forward",
            Part::SubnetEnv => "subnet.env",
            Part::Conflist => "CNI config",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The parts not in place, each with its reason; warnings do not block readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    missing: BTreeMap<Part, String>,
    warnings: BTreeMap<&'static str, String>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            missing: Part::ALL
                .iter()
                .map(|p| (*p, "not set up yet".to_string()))
                .collect(),
            warnings: BTreeMap::new(),
        }
    }
}

impl Readiness {
    pub fn set_ok(&mut self, p: Part) {
        self.missing.remove(&p);
    }

    pub fn set_missing(&mut self, p: Part, why: impl Into<String>) {
        self.missing.insert(p, why.into());
    }

    pub fn set(&mut self, p: Part, r: Result<(), String>) {
        match r {
            Ok(()) => self.set_ok(p),
            Err(why) => self.set_missing(p, why),
        }
    }

    pub fn is_ok(&self, p: Part) -> bool {
        !self.missing.contains_key(&p)
    }

    /// Everything the conflist promises is in place (the conflist itself aside).
    pub fn conflist_due(&self) -> bool {
        self.missing.keys().all(|p| *p == Part::Conflist)
    }

    pub fn is_ready(&self) -> bool {
        self.missing.is_empty()
    }

    /// A warning under `key` (e.g. "shadowed"), or None to clear it.
    pub fn warn(&mut self, key: &'static str, msg: Option<String>) {
        match msg {
            Some(m) => self.warnings.insert(key, m),
            None => self.warnings.remove(key),
        };
    }

    /// The `/readyz` body.
    pub fn body(&self) -> String {
        let mut s = if self.is_ready() {
            "twilld is ready\n".to_string()
        } else {
            "twilld is not ready\n".to_string()
        };
        for (p, why) in &self.missing {
            s.push_str(&format!("not ready: {p}: {why}\n"));
        }
        for w in self.warnings.values() {
            s.push_str(&format!("warning: {w}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_part_is_in_place() {
        let mut r = Readiness::default();
        assert!(!r.is_ready() && !r.conflist_due());
        for p in Part::ALL {
            if p != Part::Conflist {
                r.set_ok(p);
            }
        }
        assert!(r.conflist_due() && !r.is_ready());
        r.set_ok(Part::Conflist);
        assert!(r.is_ready());
        assert_eq!(r.body(), "twilld is ready\n");
        r.set(Part::SubnetEnv, Err("FLANNEL_SUBNET is garbage".into()));
        assert!(!r.is_ready() && !r.conflist_due());
        assert!(r
            .body()
            .contains("not ready: subnet.env: FLANNEL_SUBNET is garbage"));
        r.set(Part::SubnetEnv, Ok(()));
        r.warn("shadowed", Some("05-other.conflist sorts first".into()));
        assert!(r.is_ready(), "a warning does not block readiness");
        assert!(r.body().contains("warning: 05-other.conflist sorts first"));
        r.warn("shadowed", None);
        assert_eq!(r.body(), "twilld is ready\n");
    }
}
