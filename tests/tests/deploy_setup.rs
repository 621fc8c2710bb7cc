//! `scripts/setup.sh --check` and the Dockerfile's build stage: a fresh machine (or image) gets
//! everything the build needs, including the protobuf well-known types etcd-client's build
//! script compiles against (issue: `protoc failed: google/protobuf/descriptor.proto: File not
//! found` with protobuf-compiler alone).
#![cfg(feature = "root")]

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use twill_tests::deploy::repo;

/// Runs `bash scripts/setup.sh --check` from the repository root with `env` on top of an empty
/// environment (so only what the test gives it is visible).
fn setup_check(env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new("/bin/bash");
    cmd.arg("scripts/setup.sh")
        .arg("--check")
        .current_dir(repo())
        .env_clear()
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn bash scripts/setup.sh --check")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The lines `--check` lists as missing (indented under its header).
fn missing_items(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(str::to_string)
        .collect()
}

/// Where `tool` lives on the test's own PATH.
fn which(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").expect("PATH");
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not on PATH (scripts/setup.sh installs it)"))
}

/// A PATH of one temp dir holding what `setup.sh --check` runs (symlinks to the real tools),
/// without protoc, and with fake `apt-get`/`apt`/`pip`/`pip3` that record any call in `calls`.
struct FakePath {
    dir: tempfile::TempDir,
}

impl FakePath {
    fn new() -> FakePath {
        let dir = tempfile::Builder::new()
            .prefix("twill-setup-path")
            .tempdir()
            .unwrap();
        for tool in [
            "bash",
            "dirname",
            "dpkg-query",
            "grep",
            "sed",
            "mktemp",
            "rm",
            "cargo",
            "cniharness",
            "sha256sum",
            "cut",
            "cat",
        ] {
            symlink(which(tool), dir.path().join(tool)).unwrap();
        }
        // python3 may be a shim (pyenv) that needs its own PATH: link the real interpreter.
        let exe = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3");
        let exe = String::from_utf8(exe.stdout).unwrap();
        symlink(exe.trim(), dir.path().join("python3")).unwrap();
        let calls = dir.path().join("calls");
        for fake in ["apt-get", "apt", "pip", "pip3"] {
            let p = dir.path().join(fake);
            fs::write(
                &p,
                format!("#!/bin/sh\necho \"$0 $*\" >> '{}'\n", calls.display()),
            )
            .unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        FakePath { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every call of a fake installer, one per line.
    fn installer_calls(&self) -> String {
        fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }
}

#[test]
fn setup_check_finds_nothing_missing_on_this_machine() {
    let path = std::env::var_os("PATH").expect("PATH");
    let out = setup_check(&[("PATH", Path::new(&path))]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(missing_items(&out).is_empty(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing missing"),
        "{}",
        text(&out)
    );
}

#[test]
fn setup_check_names_a_missing_protoc_and_installs_nothing() {
    let fake = FakePath::new();
    let out = setup_check(&[("PATH", fake.path())]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        missing_items(&out),
        ["protoc (package protobuf-compiler)"],
        "{}",
        text(&out)
    );
    assert_eq!(fake.installer_calls(), "", "--check must not install");

    // The same PATH with protoc is complete: the failure above was protoc's alone.
    symlink(which("protoc"), fake.path().join("protoc")).unwrap();
    let out = setup_check(&[("PATH", fake.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(fake.installer_calls(), "");
}

#[test]
fn setup_check_names_missing_well_known_types_like_the_build_would_hit() {
    // A protoc that has no include dir next to it and none in /usr/include to fall back on
    // behaves like protobuf-compiler without libprotobuf-dev: a copy outside /usr/bin finds
    // its includes relative to itself (`<bin>/../include`) only.
    let fake = FakePath::new();
    let bin = fake.path().join("protoc-bin");
    fs::create_dir(&bin).unwrap();
    let protoc = bin.join("protoc");
    fs::copy(which("protoc"), &protoc).unwrap();
    // Prove the premise: this protoc cannot compile an import of descriptor.proto.
    let proto_dir = tempfile::tempdir().unwrap();
    fs::write(
        proto_dir.path().join("wkt.proto"),
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n",
    )
    .unwrap();
    let direct = Command::new(&protoc)
        .arg(format!("--proto_path={}", proto_dir.path().display()))
        .args(["-o", "/dev/null"])
        .arg(proto_dir.path().join("wkt.proto"))
        .output()
        .unwrap();
    assert!(!direct.status.success(), "the copied protoc found the WKT");
    assert!(String::from_utf8_lossy(&direct.stderr).contains("descriptor.proto"));

    // prost-build (etcd-client's build) runs $PROTOC when set; so does the check.
    symlink(which("protoc"), fake.path().join("protoc")).unwrap();
    let out = setup_check(&[("PATH", fake.path()), ("PROTOC", &protoc)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        missing_items(&out),
        ["protobuf well-known types: google/protobuf/descriptor.proto (package libprotobuf-dev)"],
        "{}",
        text(&out)
    );
    assert_eq!(fake.installer_calls(), "", "--check must not install");
}

/// Dockerfile instructions of the first (build) stage.
fn build_stage_instructions(text: &str) -> Vec<String> {
    let mut froms = 0;
    twill_tests::deploy::dockerfile_instructions(text)
        .into_iter()
        .filter(|i| {
            froms += i.starts_with("FROM ") as u32;
            froms == 1
        })
        .collect()
}

#[test]
fn dockerfile_build_stage_installs_protoc_with_its_well_known_types() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let stage = build_stage_instructions(&dockerfile);
    assert!(
        stage
            .first()
            .is_some_and(|f| f.contains(" AS build") && f.contains("rust:")),
        "{stage:?}"
    );
    let installs: Vec<&String> = stage
        .iter()
        .filter(|i| i.starts_with("RUN ") && i.contains("apt-get install"))
        .collect();
    let packages: Vec<&str> = installs.iter().flat_map(|i| i.split_whitespace()).collect();
    for pkg in ["protobuf-compiler", "libprotobuf-dev"] {
        assert!(
            packages.contains(&pkg),
            "the build stage must install {pkg}: {installs:?}"
        );
    }
    // And setup.sh, the fresh-machine path, asks for the same.
    let setup = fs::read_to_string(repo().join("scripts/setup.sh")).unwrap();
    let words: Vec<&str> = setup.split_whitespace().collect();
    assert!(words.contains(&"libprotobuf-dev") && words.contains(&"protobuf-compiler"));
}
