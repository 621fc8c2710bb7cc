//! `twilld install-cni` (the DaemonSet's init container) replaces plugins atomically: a running
//! old binary keeps running, a fresh exec runs the new one, and an exec racing the replacement
//! never sees a partial file (no ENOEXEC, no ETXTBSY, no truncated program).
#![cfg(feature = "root")]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twill_tests::deploy::{output_ok, twilld, PLUGINS};

fn install(src: &Path, dest: &Path) -> Output {
    twilld()
        .args(["install-cni", "--src-dir"])
        .arg(src)
        .arg("--dest-dir")
        .arg(dest)
        .output()
        .expect("spawn twilld install-cni")
}

fn install_ok(src: &Path, dest: &Path) {
    let out = install(src, dest);
    assert!(
        out.status.success(),
        "install-cni failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A shell "binary" that prints `version` only on its last line, after `pad` bytes of
/// comments: any truncated copy prints nothing (or fails to exec if empty).
fn script(version: &str, pad: usize) -> Vec<u8> {
    let mut s = b"#!/bin/sh\n".to_vec();
    let line = format!("# {}\n", "x".repeat(77));
    while s.len() < pad {
        s.extend_from_slice(line.as_bytes());
    }
    s.extend_from_slice(format!("echo {version}\n").as_bytes());
    s
}

fn write_exec(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A source dir whose plugins print `<tag>-<name>`.
fn source_dir(tag: &str, pad: usize) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("twill-src")
        .tempdir()
        .unwrap();
    for name in PLUGINS {
        write_exec(&d.path().join(name), &script(&format!("{tag}-{name}"), pad));
    }
    d
}

fn temp_leftovers(dest: &Path) -> Vec<String> {
    fs::read_dir(dest)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Kills the child by PID when the test ends, pass or fail.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn replaces_a_running_binary_without_disturbing_it() {
    let dest = tempfile::Builder::new()
        .prefix("twill-cnibin")
        .tempdir()
        .unwrap();
    // Version 1 of twill-bridge is a real ELF program that runs for a while.
    let v1 = source_dir("v1", 0);
    fs::copy("/usr/bin/sleep", v1.path().join("twill-bridge")).unwrap();
    install_ok(v1.path(), dest.path());
    let installed = dest.path().join("twill-bridge");
    let old_ino = fs::metadata(&installed).unwrap().ino();

    let mut running = ChildGuard(
        Command::new(&installed)
            .arg("300")
            .stdin(Stdio::null())
            .spawn()
            .expect("exec installed v1"),
    );
    let exe = PathBuf::from(format!("/proc/{}/exe", running.0.id()));
    // Wait for the exec to have happened (the child briefly is a copy of the test binary).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(&exe).map(|m| m.ino()).ok() != Some(old_ino) {
        assert!(Instant::now() < deadline, "v1 never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // What a plain `cp` over it would hit: the kernel refuses writes to a running binary.
    let in_place = fs::OpenOptions::new().write(true).open(&installed);
    eprintln!(
        "in-place write to the running binary: {:?}",
        in_place.map(drop)
    );

    let v2 = source_dir("v2", 0);
    install_ok(v2.path(), dest.path());

    assert!(
        running.0.try_wait().unwrap().is_none(),
        "the running v1 died when v2 was installed"
    );
    assert_eq!(
        fs::metadata(&exe).unwrap().ino(),
        old_ino,
        "the running process must still execute the old inode"
    );
    assert_ne!(fs::metadata(&installed).unwrap().ino(), old_ino);
    let fresh = Command::new(&installed)
        .output()
        .expect("exec installed v2");
    assert!(fresh.status.success());
    assert_eq!(String::from_utf8_lossy(&fresh.stdout), "v2-twill-bridge\n");
    for name in PLUGINS {
        let m = fs::metadata(dest.path().join(name)).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755, "{name} mode");
    }
    assert!(
        temp_leftovers(dest.path()).is_empty(),
        "{:?}",
        temp_leftovers(dest.path())
    );
}

#[test]
fn concurrent_execs_never_see_a_partial_plugin() {
    const ROUNDS: usize = 16;
    let dest = tempfile::Builder::new()
        .prefix("twill-cnibin")
        .tempdir()
        .unwrap();
    // 1 MiB per plugin so that a non-atomic copy would be visible for a long time.
    let a = source_dir("A", 1 << 20);
    let b = source_dir("B", 1 << 20);
    install_ok(a.path(), dest.path());

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut loops = Vec::new();
    let mut counters = Vec::new();
    for name in ["twill", "twill-bridge"] {
        let path = dest.path().join(name);
        let (stop, failures) = (stop.clone(), failures.clone());
        let count = Arc::new(AtomicUsize::new(0));
        counters.push(count.clone());
        let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let seen2 = seen.clone();
        let handle = std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match Command::new(&path).stdin(Stdio::null()).output() {
                    Err(e) => failures.lock().unwrap().push(format!("exec {name}: {e}")),
                    Ok(out) => {
                        let text = String::from_utf8_lossy(&out.stdout).into_owned();
                        let ok = out.status.success()
                            && (text == format!("A-{name}\n") || text == format!("B-{name}\n"));
                        if ok {
                            seen2.lock().unwrap().insert(text);
                        } else {
                            failures.lock().unwrap().push(format!(
                                "{name}: status {} stdout {text:?} stderr {:?}",
                                out.status,
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        loops.push((handle, seen));
    }

    for round in 0..ROUNDS {
        let src = if round % 2 == 0 { b.path() } else { a.path() };
        let before: Vec<usize> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        install_ok(src, dest.path());
        // Let every exec loop run at least twice against each installed version.
        for (c, start) in counters.iter().zip(before) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.load(Ordering::SeqCst) < start + 2 {
                assert!(Instant::now() < deadline, "exec loop stalled");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for (handle, seen) in loops {
        handle.join().expect("exec loop panicked");
        assert_eq!(seen.lock().unwrap().len(), 2, "both versions must have run");
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "partial plugin observed: {failures:#?}"
    );
    let total: usize = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    eprintln!("{total} execs raced {ROUNDS} replacements without a failure");

    // The last round installed A; a fresh exec runs it.
    let last = Command::new(dest.path().join("twill")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&last.stdout), "A-twill\n");
    assert!(
        temp_leftovers(dest.path()).is_empty(),
        "{:?}",
        temp_leftovers(dest.path())
    );
}

#[test]
fn keeps_the_nodes_reference_plugins_and_skips_identical_files() {
    let dest = tempfile::Builder::new()
        .prefix("twill-cnibin")
        .tempdir()
        .unwrap();
    let src = source_dir("v1", 0);
    // The node's own reference plugins: twill chains twill-portmap, never these.
    write_exec(&dest.path().join("portmap"), &script("node-portmap", 0));
    write_exec(&dest.path().join("bridge"), &script("node-bridge", 0));
    install_ok(src.path(), dest.path());

    assert_eq!(
        fs::read(dest.path().join("portmap")).unwrap(),
        script("node-portmap", 0)
    );
    assert_eq!(
        fs::read(dest.path().join("bridge")).unwrap(),
        script("node-bridge", 0)
    );
    let inodes: Vec<u64> = PLUGINS
        .iter()
        .map(|n| fs::metadata(dest.path().join(n)).unwrap().ino())
        .collect();
    // A re-run (pod restart) with the same image leaves every file as it is.
    install_ok(src.path(), dest.path());
    let again: Vec<u64> = PLUGINS
        .iter()
        .map(|n| fs::metadata(dest.path().join(n)).unwrap().ino())
        .collect();
    assert_eq!(inodes, again, "identical plugins were rewritten");

    // The reference portmap is no longer shipped: a node without one does not get one, even
    // from an image that still carries it (dirs given as the manifest does, by env).
    fs::remove_file(dest.path().join("portmap")).unwrap();
    write_exec(&src.path().join("portmap"), &script("image-portmap", 0));
    output_ok(
        twilld()
            .arg("install-cni")
            .env("TWILLD_SRC_DIR", src.path())
            .env("TWILLD_DEST_DIR", dest.path()),
    );
    assert!(!dest.path().join("portmap").exists());
    let out = Command::new(dest.path().join("twill-portmap"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v1-twill-portmap\n");
}

#[test]
fn a_broken_image_fails_without_touching_the_node() {
    let dest = tempfile::Builder::new()
        .prefix("twill-cnibin")
        .tempdir()
        .unwrap();
    let src = source_dir("v1", 0);
    fs::remove_file(src.path().join("twill-loopback")).unwrap();
    let out = install(src.path(), dest.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("twill-loopback"), "stderr: {err}");
    assert_eq!(fs::read_dir(dest.path()).unwrap().count(), 0);
}

/// Whether `lo` is administratively up inside `ns` (`ip -o link` prints its flags).
fn lo_is_up(ns: &twill_tests::netns::Netns) -> bool {
    let line = ns.exec(&["ip", "-o", "link", "show", "dev", "lo"]);
    let flags = line
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags.to_string())
        .unwrap_or_else(|| panic!("no flags in {line:?}"));
    flags.split(',').any(|f| f == "UP")
}

#[test]
fn a_node_without_loopback_gets_twill_loopback_as_loopback() {
    use twill_tests::cni::{exec, Invocation};
    use twill_tests::netns::Netns;

    let dest = tempfile::Builder::new()
        .prefix("twill-cnibin")
        .tempdir()
        .unwrap();
    // The image's real twill-loopback; the other plugins can stay scripts.
    let src = source_dir("v1", 0);
    fs::copy(
        twill_tests::bins::bin("twill-loopback"),
        src.path().join("twill-loopback"),
    )
    .unwrap();
    install_ok(src.path(), dest.path());

    let loopback = dest.path().join("loopback");
    let meta = fs::symlink_metadata(&loopback).expect("install-cni must provide loopback");
    assert!(meta.is_file(), "loopback must be a regular file");
    assert_eq!(meta.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read(&loopback).unwrap(),
        fs::read(src.path().join("twill-loopback")).unwrap()
    );

    // What containerd's go-cni does first: VERSION, then ADD of its loopback network.
    let conf =
        serde_json::json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
    let version = exec(None, &loopback, &Invocation::new("VERSION", "", ""), &conf).ok();
    let supported: Vec<&str> = version["supportedVersions"]
        .as_array()
        .unwrap_or_else(|| panic!("VERSION reply: {version}"))
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        assert!(supported.contains(&v), "{v} missing from {supported:?}");
    }

    let pod = Netns::new("lb");
    pod.exec(&["ip", "link", "set", "lo", "down"]);
    assert!(!lo_is_up(&pod));
    let inv = Invocation::new("ADD", "install-cni-lo", &pod.path()).ifname("lo");
    let result = exec(None, &loopback, &inv, &conf).ok();
    assert_eq!(
        result["interfaces"][0]["name"], "lo",
        "ADD result: {result}"
    );
    assert!(
        lo_is_up(&pod),
        "ADD through the installed loopback left lo down"
    );
    pod.exec(&["ping", "-c", "1", "-W", "5", "127.0.0.1"]);
    let inv = Invocation::new("DEL", "install-cni-lo", &pod.path()).ifname("lo");
    exec(None, &loopback, &inv, &conf).ok();
    assert!(!lo_is_up(&pod), "DEL must bring lo down again");
    assert!(
        temp_leftovers(dest.path()).is_empty(),
        "{:?}",
        temp_leftovers(dest.path())
    );
}

#[test]
fn an_existing_loopback_is_never_replaced() {
    let dest = tempfile::Builder::new()
        .prefix("twill-cnibin")
        .tempdir()
        .unwrap();
    let src = source_dir("v1", 0);
    let node_copy = script("node-loopback", 0);
    write_exec(&dest.path().join("loopback"), &node_copy);
    let ino = fs::metadata(dest.path().join("loopback")).unwrap().ino();
    install_ok(src.path(), dest.path());
    // A newer image (another twill-loopback) still leaves the node's loopback alone.
    let v2 = source_dir("v2", 0);
    install_ok(v2.path(), dest.path());

    let after = fs::metadata(dest.path().join("loopback")).unwrap();
    assert_eq!(fs::read(dest.path().join("loopback")).unwrap(), node_copy);
    assert_eq!(after.ino(), ino, "the node's loopback was rewritten");
    let out = Command::new(dest.path().join("loopback")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node-loopback\n");
    // twill-loopback itself is still twill's to update.
    let out = Command::new(dest.path().join("twill-loopback"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v2-twill-loopback\n");
}
