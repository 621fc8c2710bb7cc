//! `twill`: the meta CNI plugin named in the conflist twilld writes.

fn main() {
    twill_common::cni::run(&twill_plugins::meta::Meta)
}
