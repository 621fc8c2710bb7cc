fn main() {
    if let Some(code) = twill_plugins::bridge::reaper_main() {
        std::process::exit(code);
    }
    twill_common::cni::run(&twill_plugins::bridge::Bridge)
}
