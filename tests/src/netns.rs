//! Named network namespaces owned by a test: created unique, deleted on drop.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::sh;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named netns (`/run/netns/<name>`) with `lo` up; deleted (with every link in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `tw<prefix><pid>-<n>`; names stay within 15 chars so they can double as link names.
    pub fn new(prefix: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("tw{}{}-{}", prefix, std::process::id() % 100_000, n);
        sh::run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the CNI_NETNS form.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside, panicking on failure; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        sh::run_in(&self.name, argv)
    }

    /// Runs a command inside and returns its output whatever the status.
    pub fn output(&self, argv: &[&str]) -> std::process::Output {
        sh::output_in(&self.name, argv)
    }

    /// Whether a link of that name exists inside.
    pub fn has_link(&self, link: &str) -> bool {
        self.output(&["ip", "link", "show", "dev", link])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the netns destroys its links; veth peers elsewhere go with them.
        let _ = sh::output(&["ip", "netns", "del", &self.name]);
    }
}

/// Connects two namespaces with a veth pair (`a_if` in `a`, `b_if` in `b`), both up.
/// The pair is created inside `a`, so nothing ever appears in the root namespace.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.exec(&[
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.exec(&["ip", "link", "set", a_if, "up"]);
    b.exec(&["ip", "link", "set", b_if, "up"]);
}
