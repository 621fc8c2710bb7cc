//! Counters and gauges exported at `/metrics` in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// subnet.env written, conflist written and backend programmed.
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, r: bool) {
        self.ready.store(r, Ordering::Relaxed);
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
            "twill_ready",
            "gauge",
            "1 when subnet.env, the CNI config and the backend are in place.",
            self.is_ready() as u64,
        );
        s
    }
}
