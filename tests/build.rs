//! Says, visibly, when the root-only integration tests are left out of a build.

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_ROOT");
    if std::env::var_os("CARGO_FEATURE_ROOT").is_none() {
        println!(
            "cargo:warning=twill-tests: the root-only integration tests are not built \
             (run `bash scripts/test.sh root` as root, or `cargo test --features twill-tests/root`)"
        );
    }
}
