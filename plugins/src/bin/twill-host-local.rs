fn main() {
    twill_common::cni::run(&twill_plugins::host_local::HostLocal)
}
