//! Every fuzz target as a bounded property test: first each input of its corpus
//! (`corpus/<target>/`, what libFuzzer runs found and kept), then random inputs from bolero
//! (`BOLERO_RANDOM_ITERATIONS`, 2000 by default here, so `cargo test` stays quick).

use std::path::Path;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    inputs.sort();
    inputs
}

fn check(name: &str) {
    let target = kiln_fuzz::target(name).expect("a known target");
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "corpus/{name} is empty");
    for input in &seeds {
        target(input);
    }
    if std::env::var_os("BOLERO_RANDOM_ITERATIONS").is_none() {
        // SAFETY: set before bolero reads it, in this test's own thread; tests that read the
        // environment concurrently read the same value.
        unsafe { std::env::set_var("BOLERO_RANDOM_ITERATIONS", "2000") };
    }
    bolero::check!()
        .with_max_len(64 * 1024)
        .for_each(|input: &[u8]| target(input));
}

#[test]
fn blk_queue() {
    check("blk_queue");
}

#[test]
fn vsock_queue() {
    check("vsock_queue");
}

#[test]
fn balloon_queue() {
    check("balloon_queue");
}

#[test]
fn net_queue() {
    check("net_queue");
}

#[test]
fn mmio() {
    check("mmio");
}

#[test]
fn http_request() {
    check("http_request");
}

#[test]
fn api_body() {
    check("api_body");
}

#[test]
fn snapshot_state() {
    check("snapshot_state");
}

#[test]
fn agent_frames() {
    check("agent_frames");
}

#[test]
fn agent_restore() {
    check("agent_restore");
}

#[test]
fn every_target_has_a_test() {
    let here = include_str!("targets.rs");
    for (name, _) in kiln_fuzz::TARGETS {
        assert!(here.contains(&format!("fn {name}()")), "{name} has no test");
    }
}
