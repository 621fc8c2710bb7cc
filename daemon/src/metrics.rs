//! Counters and gauges exported at `/metrics` in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::guard::Reason;
use crate::readiness::Readiness;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything the health server reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Leases in the store, ours included (gauge).
    pub leases_known: Counter,
    /// Peers whose data path is programmed (gauge).
    pub peers_programmed: Counter,
    /// Kernel entries added or removed by a reconcile pass because they had drifted.
    pub reconcile_corrections: Counter,
    /// Times the etcd watch was re-established after a failure.
    pub etcd_reconnects: Counter,
    /// Successful renewals of our etcd lease.
    pub lease_renewals: Counter,
    /// Peers the kernel refused in the last pass (gauge; retried every pass).
    pub peers_failed: Counter,
    /// 1 while another network's CNI config sorts before twill's (gauge).
    pub cni_config_shadowed: Counter,
    /// Leases the lease guard keeps out of the kernel, by reason (gauge).
    rejected: Mutex<BTreeMap<Reason, u64>>,
    /// What `/readyz` reports.
    readiness: Mutex<Option<Readiness>>,
}

impl Metrics {
    pub fn is_ready(&self) -> bool {
        self.readiness
            .lock()
            .map(|r| r.as_ref().is_some_and(Readiness::is_ready))
            .unwrap_or(false)
    }

    pub fn set_readiness(&self, r: &Readiness) {
        if let Ok(mut g) = self.readiness.lock() {
            if g.as_ref() != Some(r) {
                *g = Some(r.clone());
            }
        }
    }

    /// The `/readyz` body.
    pub fn readiness_body(&self) -> String {
        self.readiness
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(Readiness::body))
            .unwrap_or_else(|| "twilld is starting\n".into())
    }

    pub fn set_rejected(&self, counts: BTreeMap<Reason, u64>) {
        if let Ok(mut g) = self.rejected.lock() {
            *g = counts;
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "twill_leases_known",
            "gauge",
            "Subnet leases known from etcd, including this node's.",
            self.leases_known.get(),
        );
        one(
            "twill_peers_programmed",
            "gauge",
            "Peers whose routes are programmed.",
            self.peers_programmed.get(),
        );
        one(
            "twill_reconcile_corrections_total",
            "counter",
            "Kernel entries fixed by reconcile passes.",
            self.reconcile_corrections.get(),
        );
        one(
            "twill_etcd_reconnects_total",
            "counter",
            "etcd watch re-establishments after failures.",
            self.etcd_reconnects.get(),
        );
        one(
            "twill_lease_renewals_total",
            "counter",
            "Renewals of this node's etcd lease.",
            self.lease_renewals.get(),
        );
        one(
            "twill_peers_failed",
            "gauge",
            "Peers the kernel refused in the last reconcile pass (retried every pass).",
            self.peers_failed.get(),
        );
        one(
            "twill_cni_config_shadowed",
            "gauge",
            "1 while another network's CNI config sorts before twill's (the runtime uses that one).",
            self.cni_config_shadowed.get(),
        );
        one(
            "twill_ready",
            "gauge",
            "1 when the lease, device, peers, rules, subnet.env and the CNI config are in place.",
            self.is_ready() as u64,
        );
        let _ = writeln!(
            s,
            "# HELP twill_leases_rejected Leases the lease guard keeps out of the kernel, by reason.\n# TYPE twill_leases_rejected gauge"
        );
        let rejected = self.rejected.lock().map(|g| g.clone()).unwrap_or_default();
        for r in Reason::ALL {
            let n = rejected.get(&r).copied().unwrap_or(0);
            let _ = writeln!(s, "twill_leases_rejected{{reason=\"{r}\"}} {n}");
        }
        s
    }
}
