//! Stdin of many sizes, written in many ways, into a pipeline that reads it all before it
//! prints (`sha256sum | cut`): the output is the right checksum every time, and the exec does
//! not end late (the agent's output grace, a minute in these tests, must not fire for a process that closed its
//! pipes on exit). Issue 11 item 12: once, 5 MB through `sha256sum | cut` printed nothing.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Agent, GRACE_MS};
use kiln_agent::protocol::{ExecSpec, ExitStatus};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn checksums_of_stdin_are_always_printed_and_never_late() {
    let agent = Agent::start("stdin-stress");
    let c = agent.client();
    let sizes = [
        0usize,
        1,
        4095,
        4096,
        65535,
        65536,
        65537,
        262_144,
        262_145,
        1 << 20,
        5 << 20,
    ];
    let mut worst = Duration::ZERO;
    for (round, &size) in sizes.iter().cycle().take(3 * sizes.len()).enumerate() {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + round) as u8).collect();
        let want = hex(&Sha256::digest(&data));
        let mut spec = ExecSpec::new(["sh", "-c", "sha256sum | cut -c1-64"]);
        spec.stdin = true;
        let start = Instant::now();
        let mut exec = c.exec(spec).unwrap();
        let mut stdin = exec.take_stdin().unwrap();
        // Three ways to write: one big write, small pieces, pieces with pauses between.
        let chunk = [usize::MAX, 1000, 70_000][round % 3];
        let feeder = std::thread::spawn(move || {
            for (i, piece) in data.chunks(chunk.min(data.len().max(1))).enumerate() {
                stdin.write_all(piece).unwrap();
                if round % 3 == 2 && i % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            stdin.close();
        });
        let out = exec.output().unwrap();
        let took = start.elapsed();
        feeder.join().unwrap();
        assert_eq!(
            out.status,
            ExitStatus::Exited(0),
            "size {size} round {round}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{want}\n"),
            "size {size} round {round}: stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        worst = worst.max(took);
        // A process that ends with its pipes closed is reported at once, never after the
        // output grace (a minute here, so no slow machine can be mistaken for it).
        assert!(
            took < Duration::from_millis(GRACE_MS),
            "size {size} round {round}: the exec waited out the output grace ({took:?})"
        );
    }
    println!("worst exec: {worst:?}");
}

#[test]
fn true_with_stdin_open_ends_without_the_output_grace() {
    let agent = Agent::start("true-grace");
    let c = agent.client();
    let mut slow = Vec::new();
    for _ in 0..30 {
        let mut spec = ExecSpec::new(["true"]);
        spec.stdin = true;
        let start = Instant::now();
        let mut exec = c.exec(spec).unwrap();
        let stdin = exec.take_stdin().unwrap();
        let out = exec.output().unwrap();
        let took = start.elapsed();
        drop(stdin);
        assert_eq!(out.status, ExitStatus::Exited(0));
        if took >= Duration::from_millis(GRACE_MS) {
            slow.push(took);
        }
    }
    assert!(
        slow.is_empty(),
        "execs of true that waited out the grace: {slow:?}"
    );
}
