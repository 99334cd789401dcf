//! The `restored` handler against a recording kernel (this host's clock is never stepped), and
//! the real RNG ioctls, which only add to the host's entropy pool and reseed it: harmless.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use super::*;
use crate::guest::ShutdownMode;
use crate::protocol::{ErrorKind, Event, RestoreSpec};

/// What the recording kernel saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    entropy: Vec<Vec<u8>>,
    reseeds: u32,
    clock_set_to: Vec<u64>,
    net: Vec<crate::protocol::Net>,
}

/// A kernel whose clock reads `now_ns` and records every change; `fail_reseed` makes the reseed
/// fail with EPERM.
#[derive(Clone)]
struct Recording {
    seen: Arc<Mutex<Seen>>,
    now_ns: i128,
    fail_reseed: bool,
}

impl Recording {
    fn new(now_ns: i128) -> Recording {
        Recording {
            seen: Arc::default(),
            now_ns,
            fail_reseed: false,
        }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl Kernel for Recording {
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        self.seen.lock().unwrap().entropy.push(bytes.to_vec());
        Ok(())
    }
    fn reseed_crng(&self) -> io::Result<()> {
        if self.fail_reseed {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.seen.lock().unwrap().reseeds += 1;
        Ok(())
    }
    fn realtime_ns(&self) -> io::Result<i128> {
        Ok(self.now_ns)
    }
    fn set_realtime_ns(&self, ns: u64) -> io::Result<()> {
        self.seen.lock().unwrap().clock_set_to.push(ns);
        Ok(())
    }
    fn configure_net(&self, net: &crate::protocol::Net) -> io::Result<()> {
        self.seen.lock().unwrap().net.push(net.clone());
        Ok(())
    }
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn spec(entropy: &[u8], time_ns: u64, env: BTreeMap<String, String>) -> RestoreSpec {
    RestoreSpec {
        entropy: crate::protocol::restore::encode_hex(entropy),
        time_ns,
        env,
        net: None,
    }
}

#[test]
fn network_settings_are_applied_after_the_clock_and_checked_first() {
    let kernel = Recording::new(1_000);
    let agent = Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone());
    let net = crate::protocol::NetSpec {
        address: "172.16.0.2/30".into(),
        gateway: "172.16.0.1".into(),
        dns: vec!["172.16.0.1".into()],
    };
    let good = spec(&[7; 32], 5_000, env(&[])).with_net(Some(net.clone()));
    assert!(matches!(restored(&agent, &good), Event::Restored { .. }));
    let seen = kernel.seen();
    assert_eq!(seen.net.len(), 1);
    assert_eq!(seen.net[0].address.to_string(), "172.16.0.2");
    assert_eq!(seen.net[0].prefix, 30);

    let bad = spec(&[7; 32], 6_000, env(&[])).with_net(Some(crate::protocol::NetSpec {
        gateway: "10.9.9.9".into(),
        ..net
    }));
    match restored(&agent, &bad) {
        Event::Error(info) => {
            assert_eq!(info.kind, ErrorKind::BadRequest);
            assert_eq!(
                info.message,
                "net.gateway 10.9.9.9 is not another host of 172.16.0.2/30's subnet"
            );
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    let after = kernel.seen();
    assert_eq!(after.net.len(), 1, "nothing applied");
    assert_eq!(after.clock_set_to, seen.clock_set_to, "not even the clock");
}

#[test]
fn mixes_entropy_steps_the_clock_and_sets_the_env() {
    let kernel = Recording::new(1_000_000_000_000);
    let agent = Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone());
    let entropy: Vec<u8> = (0..40).collect();
    let event = restored(
        &agent,
        &spec(&entropy, 1_000_000_500_000, env(&[("A", "1")])),
    );
    assert_eq!(
        event,
        Event::Restored {
            clock_step_ns: 500_000,
            entropy_bytes: 40
        }
    );
    assert_eq!(
        kernel.seen(),
        Seen {
            entropy: vec![entropy],
            reseeds: 1,
            clock_set_to: vec![1_000_000_500_000],
            net: Vec::new(),
        }
    );
    assert_eq!(agent.default_env(), env(&[("A", "1")]));

    // A later one replaces the environment rather than adding to it; a clock ahead of the host
    // is stepped back.
    let event = restored(&agent, &spec(&[7; 32], 999, env(&[("B", "2")])));
    assert_eq!(
        event,
        Event::Restored {
            clock_step_ns: 999 - 1_000_000_000_000,
            entropy_bytes: 32
        }
    );
    assert_eq!(agent.default_env(), env(&[("B", "2")]));
}

#[test]
fn bad_requests_change_nothing() {
    let kernel = Recording::new(5);
    let agent = Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone());
    agent.set_default_env(env(&[("KEEP", "me")]));
    let cases = [
        (spec(&[1; 31], 10, BTreeMap::new()), "entropy: 31 bytes"),
        (
            RestoreSpec {
                entropy: "zz".repeat(32),
                time_ns: 10,
                env: BTreeMap::new(),
                net: None,
            },
            "entropy: 'z'",
        ),
        (spec(&[1; 32], 0, BTreeMap::new()), "time_ns: 0"),
        (spec(&[1; 32], 10, env(&[("", "x")])), "env: variable name"),
    ];
    for (s, start) in cases {
        match restored(&agent, &s) {
            Event::Error(info) => {
                assert_eq!(info.kind, ErrorKind::BadRequest, "{s:?}");
                assert!(info.message.starts_with(start), "{}", info.message);
            }
            other => panic!("{s:?} answered {other:?}"),
        }
    }
    assert_eq!(kernel.seen(), Seen::default());
    assert_eq!(agent.default_env(), env(&[("KEEP", "me")]));
}

#[test]
fn a_failed_step_is_named_and_stops_the_rest() {
    let mut kernel = Recording::new(5);
    kernel.fail_reseed = true;
    let agent = Agent::new(ShutdownMode::Exit).with_kernel(kernel.clone());
    let Event::Error(info) = restored(&agent, &spec(&[1; 32], 10, env(&[("A", "1")]))) else {
        panic!("a failed reseed was not reported");
    };
    assert_eq!(info.kind, ErrorKind::PermissionDenied);
    assert_eq!(info.errno, Some(libc::EPERM));
    assert!(
        info.message.starts_with(
            "restored: reseeding the kernel RNG (RNDRESEEDCRNG on /dev/urandom) failed: "
        ),
        "{}",
        info.message
    );
    assert!(
        info.message
            .contains("the clock and environment were not changed")
    );
    let seen = kernel.seen();
    assert_eq!((seen.entropy.len(), seen.clock_set_to.len()), (1, 0));
    assert!(agent.default_env().is_empty());
}

#[test]
fn the_real_rng_ioctls() {
    // Adding 32 bytes to the host's pool and reseeding are harmless; both need CAP_SYS_ADMIN.
    let added = LinuxKernel.add_entropy(&[0x5a; 32]);
    let reseeded = LinuxKernel.reseed_crng();
    if crate::guest::sys::euid() == 0 {
        added.unwrap();
        reseeded.unwrap();
    } else {
        assert_eq!(added.unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(reseeded.unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
    // An odd length that does not fill the last word is laid out right too.
    if crate::guest::sys::euid() == 0 {
        LinuxKernel.add_entropy(&[1, 2, 3, 4, 5]).unwrap();
    }
}

#[test]
fn the_real_clock_reads_the_time() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let read = LinuxKernel.realtime_ns().unwrap();
    assert!((read - now).abs() < 5_000_000_000, "{read} vs {now}");
}
