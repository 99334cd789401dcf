//! The libFuzzer driver for Kiln's targets: `KILN_FUZZ_TARGET=<name> kiln-fuzz [libFuzzer
//! options] [CORPUS]...`, built with coverage instrumentation by `cargo xtask fuzz`.

#![no_main]

use std::sync::OnceLock;

fn target() -> fn(&[u8]) {
    static TARGET: OnceLock<fn(&[u8])> = OnceLock::new();
    *TARGET.get_or_init(|| {
        let name = std::env::var("KILN_FUZZ_TARGET").unwrap_or_default();
        kiln_fuzz::target(&name).unwrap_or_else(|| {
            let names: Vec<&str> = kiln_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
            eprintln!("kiln-fuzz: KILN_FUZZ_TARGET={name:?} is not one of {names:?}");
            std::process::exit(2)
        })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| target()(data));
