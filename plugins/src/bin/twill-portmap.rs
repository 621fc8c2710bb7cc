fn main() {
    twill_common::cni::run(&twill_plugins::portmap::Portmap)
}
