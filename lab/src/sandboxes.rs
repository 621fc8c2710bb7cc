//! `twill-lab up --runtime containerd`: every node runs its own containerd (1.6, runc; see
//! [`crate::containerd`]) in its namespace, with the node's CNI bin and conf dirs, and pods
//! are CRI sandboxes (`RunPodSandbox`), attached by containerd's go-cni through the same
//! conflist twilld writes: what a kubelet node does.
//!
//! Each containerd keeps everything below `<state>/nodes/nodeN/containerd/`; its [`Record`]
//! (dirs, PID and start time, sandboxes and shim PIDs seen) is in the node's entry of
//! `lab.json`, written before containerd starts, so `status` and `down` find it from another
//! process. A pod's `ns` is then the path of the sandbox's netns mount (below containerd's
//! state dir), which the probes enter by path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::containerd::{self, Containerd, PodSpec, Record, Spec};
use crate::error::{Error, Result};
use crate::process::wait_for;
use crate::runtime::Kind;
use crate::{table, Lab, NodeRec, PodRec};

impl PodRec {
    /// Whether the pod is a containerd sandbox (its `ns` is then a netns path).
    pub fn is_sandbox(&self) -> bool {
        self.sandbox.is_some()
    }
}

impl Lab {
    /// The runtime the lab's pods go through.
    pub fn runtime_kind(&self) -> Kind {
        self.st.opts.runtime
    }

    fn containerd_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("containerd")
    }

    /// The sandbox image tarball, built once per lab.
    fn sandbox_image(&self) -> Result<PathBuf> {
        let dir = self.state_dir();
        let tar = dir.join("sandbox-image.tar");
        if tar.is_file() {
            return Ok(tar);
        }
        containerd::write_sandbox_image(&dir)
    }

    fn save_containerd(&mut self, node: &str, rec: Record) -> Result<()> {
        self.node_mut(node)?.containerd = Some(rec);
        self.save()
    }

    /// Starts the containerd of each node where none runs (recorded before it starts), without
    /// waiting for them: they come up while the nodes' twilld acquire their leases.
    pub fn spawn_containerds(&mut self, nodes: &[String]) -> Result<()> {
        for node in nodes {
            let rec = self.node(node)?.clone();
            let rec = match rec.containerd {
                Some(r) if r.proc.as_ref().is_some_and(|p| p.alive()) => continue,
                Some(r) => r,
                None => Record::new(Spec::new(
                    &self.containerd_dir(node),
                    &format!("/run/netns/{}", rec.ns),
                    &self.bin_dir(node),
                    &self.conf_dir(node),
                    // Named like the node's namespace: one cgroup subtree per lab node.
                    &format!("/{}", rec.ns),
                )),
            };
            self.save_containerd(node, rec.clone())?;
            let c = Containerd::respawn(rec)?;
            self.save_containerd(node, c.record())?;
        }
        Ok(())
    }

    /// Waits (in parallel) until each node's containerd answers CRI and has the sandbox image.
    pub fn ready_containerds(&mut self, nodes: &[String]) -> Result<()> {
        let image = self.sandbox_image()?;
        let mut cs = Vec::new();
        for node in nodes {
            let rec = self.node(node)?.containerd.clone().ok_or_else(|| {
                Error::Lab(format!(
                    "{node} has no containerd (lab runtime: {})",
                    self.runtime_kind()
                ))
            })?;
            let c = Containerd::attach(rec)?;
            if !(c.connected() && c.image_imported()) {
                cs.push((node.clone(), c));
            }
        }
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = cs
                .iter_mut()
                .map(|(_, c)| {
                    let image = &image;
                    s.spawn(move || {
                        c.wait_ready()?;
                        if !c.image_imported() {
                            c.import_image(image)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Lab("containerd start thread panicked".into()))
                    })
                })
                .collect()
        });
        for ((node, c), res) in cs.iter().zip(results) {
            self.save_containerd(node, c.record())?;
            res.map_err(|e| Error::Lab(format!("containerd of {node}: {e}")))?;
        }
        Ok(())
    }

    /// Starts the node's containerd (no-op while it runs) and waits for it.
    pub fn start_containerd(&mut self, node: &str) -> Result<()> {
        let nodes = [node.to_string()];
        self.spawn_containerds(&nodes)?;
        self.ready_containerds(&nodes)
    }

    /// A CRI client to the node's containerd.
    pub fn containerd(&self, node: &str) -> Result<Containerd> {
        let rec = self.node(node)?.containerd.clone().ok_or_else(|| {
            Error::Lab(format!(
                "{node} has no containerd (lab runtime: {})",
                self.runtime_kind()
            ))
        })?;
        let c = Containerd::attach(rec)?;
        if !c.connected() {
            return Err(Error::Lab(format!(
                "containerd of {node} is not running; see {}",
                c.log_path().display()
            )));
        }
        Ok(c)
    }

    /// Waits until the node's containerd reports CRI NetworkReady (it saw a CNI config).
    pub fn wait_network_ready(&self, node: &str, secs: u64) -> Result<Duration> {
        let t0 = Instant::now();
        let c = self.containerd(node)?;
        wait_for(
            &format!("containerd of {node} to report NetworkReady"),
            secs,
            || c.network_ready().ok().filter(|(ready, _)| *ready),
        )?;
        Ok(t0.elapsed())
    }

    /// `up`'s containerd step: every containerd answering with the sandbox image, then CRI
    /// NetworkReady (containerd saw twilld's conflist) on every node.
    pub(crate) fn report_containerds(&mut self, out: &mut dyn std::io::Write) -> Result<()> {
        let t0 = Instant::now();
        let nodes: Vec<String> = self.st.nodes.iter().map(|n| n.name.clone()).collect();
        self.ready_containerds(&nodes)?;
        let t_ready = t0.elapsed();
        let t1 = Instant::now();
        for n in &nodes {
            self.wait_network_ready(n, 60)?;
        }
        // One line whatever the lab's size.
        let _ = writeln!(
            out,
            "{} containerd answering CRI, sandbox image imported ({:.2} s after the nodes were \
             Ready); CRI NetworkReady true on every node ({:.2} s later)",
            nodes.len(),
            t_ready.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        let _ = writeln!(out);
        Ok(())
    }

    /// RunPodSandbox on the node's containerd; the pod's `ns` is the sandbox's netns path.
    pub(crate) fn add_sandbox(&mut self, node: &str, name: String) -> Result<PodRec> {
        self.ready_containerds(&[node.to_string()])?;
        let c = self.containerd(node)?;
        // Named as the lab runtime names its pods in CNI_ARGS (K8S_POD_NAME).
        let spec = PodSpec::new(
            &format!("{node}-{name}"),
            "default",
            &format!("{}-{node}-{name}", self.name()),
        );
        let id = c.run_pod(&spec);
        // Saved whatever happened: a failed sandbox may still have cached a CNI result.
        self.save_containerd(node, c.record())?;
        let id = id?;
        let st = c.pod_status(&id)?;
        let ns = st.netns.ok_or_else(|| {
            Error::Lab(format!(
                "sandbox {id} of {node}/{name} has no network namespace"
            ))
        })?;
        let pod = PodRec {
            node: node.to_string(),
            name,
            ns,
            container_id: id.clone(),
            ip: st.ip,
            sandbox: Some(id),
        };
        self.st.pods.push(pod.clone());
        self.save()?;
        Ok(pod)
    }

    /// StopPodSandbox (CNI DEL) and RemovePodSandbox.
    pub(crate) fn del_sandbox(&mut self, pod: &PodRec) -> Result<()> {
        let c = self.containerd(&pod.node)?;
        c.stop_pod(&pod.container_id)?;
        c.remove_pod(&pod.container_id)?;
        self.st.pods.retain(|p| p.ns != pod.ns);
        self.save()
    }

    /// The sandbox is ready and has the IP it was given.
    pub(crate) fn check_sandbox(&self, pod: &PodRec) -> Result<()> {
        let st = self.containerd(&pod.node)?.pod_status(&pod.container_id)?;
        if st.ready && st.ip == pod.ip {
            Ok(())
        } else {
            Err(Error::Lab(format!(
                "sandbox {}/{}: ready {}, IP {:?} (recorded {:?})",
                pod.node, pod.name, st.ready, st.ip, pod.ip
            )))
        }
    }

    /// Removes the node's containerd and everything it made (a node leaving).
    pub(crate) fn stop_containerd(&mut self, node: &str) -> Result<()> {
        let Some(rec) = self.node(node)?.containerd.clone() else {
            return Ok(());
        };
        let mut c = Containerd::attach(rec)?;
        let errors = c.teardown();
        c.remove_created_dirs();
        self.save_containerd(node, c.record())?;
        self.node_mut(node)?.containerd = None;
        self.save()?;
        match errors.first() {
            None => Ok(()),
            Some(e) => Err(Error::Lab(format!("containerd of {node}: {e}"))),
        }
    }

    /// `down`'s containerd step: every node's sandboxes removed through CRI, then containerd,
    /// shims, mounts, cgroups and result cache entries; the shared dirs last. Errors as text.
    pub(crate) fn teardown_containerds(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut done = Vec::new();
        for n in &self.st.nodes {
            let Some(rec) = n.containerd.clone() else {
                continue;
            };
            match Containerd::attach(rec) {
                Ok(mut c) => {
                    errors.extend(
                        c.teardown()
                            .into_iter()
                            .map(|e| format!("containerd of {}: {e}", n.name)),
                    );
                    done.push(c);
                }
                Err(e) => errors.push(format!("containerd of {}: {e}", n.name)),
            }
        }
        // Only once all are gone: one node's shims may live in a dir another's created.
        for c in &done {
            c.remove_created_dirs();
        }
        errors
    }

    /// Text of the containerd table (empty unless the lab runs pods in containerd).
    pub fn containerd_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .st
            .nodes
            .iter()
            .filter_map(|n: &NodeRec| {
                let rec = n.containerd.clone()?;
                let sock = rec.spec.socket().display().to_string();
                let c = Containerd::attach(rec).ok();
                let live = c.as_ref().filter(|c| c.connected());
                let ready = live
                    .and_then(|c| c.network_ready().ok())
                    .map(|(r, _)| r.to_string())
                    .unwrap_or_else(|| "-".into());
                let sandboxes = live
                    .and_then(|c| c.list_pods().ok())
                    .map(|l| {
                        let up = l.iter().filter(|(_, r)| *r).count();
                        format!("{up}/{}", l.len())
                    })
                    .unwrap_or_else(|| "-".into());
                let pid = c
                    .as_ref()
                    .and_then(Containerd::pid)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into());
                Some(vec![n.name.clone(), pid, ready, sandboxes, sock])
            })
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        table::render(
            &[
                "NODE",
                "CONTAINERD PID",
                "NETWORKREADY",
                "SANDBOXES READY",
                "CRI SOCKET",
            ],
            &rows,
        )
    }
}
