//! The embedded filters decode, and the JSON they come from says what it means: every filter
//! traps on a mismatch (and allows what the SIGSYS handler and malloc call), every rule says why, and every named number (ioctl requests, signals,
//! socket and fcntl arguments) is the number the name stands for on this target.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use serde_json::Value;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::*;

const JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../resources/seccomp/x86_64.json"
));

// The requests as kvm-ioctls defines them (its own definitions are private).
const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

/// The names a condition's comment may start with, and their values.
fn known() -> BTreeMap<&'static str, u64> {
    let mut m: BTreeMap<&'static str, u64> = [
        ("KVM_RUN", KVM_RUN()),
        ("KVM_GET_REGS", KVM_GET_REGS()),
        ("KVM_GET_SREGS", KVM_GET_SREGS()),
        ("KVM_GET_MSRS", KVM_GET_MSRS()),
        ("KVM_GET_LAPIC", KVM_GET_LAPIC()),
        ("KVM_GET_CPUID2", KVM_GET_CPUID2()),
        ("KVM_GET_MP_STATE", KVM_GET_MP_STATE()),
        ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS()),
        ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS()),
        ("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ()),
        ("KVM_GET_XSAVE", KVM_GET_XSAVE()),
        ("KVM_GET_XCRS", KVM_GET_XCRS()),
        ("KVM_KVMCLOCK_CTRL", KVM_KVMCLOCK_CTRL()),
        ("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG()),
        ("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP()),
        ("KVM_SET_CLOCK", KVM_SET_CLOCK()),
        ("KVM_GET_CLOCK", KVM_GET_CLOCK()),
        ("KVM_GET_PIT2", KVM_GET_PIT2()),
    ]
    .into_iter()
    .collect();
    let libc_values: [(&'static str, i64); 23] = [
        ("TCGETS", libc::TCGETS as i64),
        ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD as i64),
        ("TCSETS", libc::TCSETS as i64),
        ("FIONBIO", libc::FIONBIO as i64),
        ("SIGABRT", libc::SIGABRT.into()),
        ("SIGRTMIN", vmm_sys_util::signal::SIGRTMIN().into()),
        ("AF_UNIX", libc::AF_UNIX.into()),
        (
            "SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC",
            (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC).into(),
        ),
        ("SOCK_CLOEXEC", libc::SOCK_CLOEXEC.into()),
        (
            "SOCK_NONBLOCK|SOCK_CLOEXEC",
            (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC).into(),
        ),
        ("SHUT_RD", libc::SHUT_RD.into()),
        ("SHUT_WR", libc::SHUT_WR.into()),
        ("F_GETFD", libc::F_GETFD.into()),
        ("PROT_EXEC", libc::PROT_EXEC.into()),
        ("MADV_DONTNEED", libc::MADV_DONTNEED.into()),
        ("MADV_REMOVE", libc::MADV_REMOVE.into()),
        (
            "FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE",
            (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE).into(),
        ),
        ("MREMAP_MAYMOVE", libc::MREMAP_MAYMOVE.into()),
        (
            "O_RDONLY|O_CLOEXEC",
            (libc::O_RDONLY | libc::O_CLOEXEC).into(),
        ),
        (
            "O_RDWR|O_CREAT|O_EXCL|O_CLOEXEC",
            (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC).into(),
        ),
        ("FUTEX_WAIT", libc::FUTEX_WAIT.into()),
        ("FUTEX_WAKE", libc::FUTEX_WAKE.into()),
        ("FUTEX_WAIT_BITSET", libc::FUTEX_WAIT_BITSET.into()),
    ];
    for (name, value) in libc_values {
        m.insert(name, value as u64);
    }
    m
}

fn filters() -> serde_json::Map<String, Value> {
    match serde_json::from_str(JSON).expect("the filters are JSON") {
        Value::Object(m) => m,
        other => panic!("the filters are not an object: {other}"),
    }
}

#[test]
fn every_embedded_filter_decodes() {
    for kind in ThreadKind::ALL {
        let p = program(kind).unwrap();
        assert!(p.len() > 4, "{kind}: {} instructions", p.len());
    }
    assert!(SeccompFilters::embedded().unwrap().is_enabled());
    assert!(!SeccompFilters::disabled().is_enabled());
}

#[test]
fn every_filter_traps_on_a_mismatch_and_every_rule_says_why() {
    let filters = filters();
    let names: Vec<&str> = filters.keys().map(String::as_str).collect();
    assert_eq!(names, ["api", "vcpu", "vmm"]);
    for (name, filter) in &filters {
        // Trap, not kill_process: the SIGSYS handler says which call stopped which thread.
        assert_eq!(filter["default_action"], "trap", "{name}");
        assert_eq!(filter["filter_action"], "allow", "{name}");
        for rule in filter["filter"].as_array().unwrap() {
            let comment = rule["comment"].as_str().unwrap_or_default();
            assert!(!comment.is_empty(), "{name}: {rule} has no comment");
        }
    }
}

#[test]
fn every_named_argument_has_the_value_its_name_stands_for() {
    let known = known();
    for (name, filter) in filters() {
        for rule in filter["filter"].as_array().unwrap() {
            let syscall = rule["syscall"].as_str().unwrap();
            for cond in rule["args"].as_array().into_iter().flatten() {
                let comment = cond["comment"].as_str().unwrap_or_default();
                // "without X": the bits of X are masked and must be clear; otherwise the comment
                // names the value compared with.
                let (word, got) = match comment.strip_prefix("without ") {
                    Some(rest) => {
                        assert_eq!(cond["val"], 0, "{name}: {syscall}: {cond}");
                        (rest, cond["op"]["masked_eq"].as_u64().unwrap_or_default())
                    }
                    None => (comment, cond["val"].as_u64().unwrap()),
                };
                let word = word.split_whitespace().next().unwrap_or_default();
                let value = known.get(word).unwrap_or_else(|| {
                    panic!("{name}: {syscall}: argument {cond} is not named by its comment")
                });
                assert_eq!(
                    got, *value,
                    "{name}: {syscall}: {word} is {value:#x}, the JSON says {got:#x}"
                );
            }
        }
    }
}

/// The syscalls of `filter` named `name`, with their argument conditions.
fn rules<'a>(filter: &'a Value, name: &str) -> Vec<&'a Value> {
    filter["filter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["syscall"] == name)
        .collect()
}

#[test]
fn every_filter_allows_what_malloc_free_and_realloc_call() {
    // See malloc.rs: with one arena and a fixed mmap threshold, these are all of them.
    for (kind, filter) in filters() {
        for name in ["brk", "mmap", "munmap", "mremap"] {
            assert!(!rules(&filter, name).is_empty(), "{kind}: no {name}");
        }
        let mremap = rules(&filter, "mremap");
        assert_eq!(
            mremap[0]["args"][0]["val"],
            libc::MREMAP_MAYMOVE,
            "{kind}: realloc's mremap flags"
        );
        let futex_ops: Vec<&Value> = rules(&filter, "futex")
            .iter()
            .map(|r| &r["args"][0]["val"])
            .collect();
        for op in [libc::FUTEX_WAIT, libc::FUTEX_WAKE, libc::FUTEX_WAIT_BITSET] {
            assert!(futex_ops.contains(&&Value::from(op)), "{kind}: futex {op}");
        }
        // Nothing makes memory executable, and nothing needs to change protections at all.
        assert!(rules(&filter, "mprotect").is_empty(), "{kind}: mprotect");
    }
}

#[test]
fn every_filter_allows_what_the_sigsys_handler_calls() {
    // sigsys.rs: a report to stderr, then exit_group; neither with conditions that could
    // refuse the handler.
    for (kind, filter) in filters() {
        for name in ["write", "exit_group"] {
            let rules = rules(&filter, name);
            assert!(
                rules.iter().any(|r| r.get("args").is_none()),
                "{kind}: {name} is not allowed without conditions"
            );
        }
    }
}

#[test]
fn a_seccompiler_bin_filter_file_loads_and_bad_ones_are_named() {
    let dir = std::env::temp_dir().join(format!("kiln-seccomp-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vmm = program(ThreadKind::Vmm).unwrap();
    let api = program(ThreadKind::Api).unwrap();
    let vcpu = program(ThreadKind::Vcpu).unwrap();
    let good = dir.join("good.bpf");
    std::fs::write(
        &good,
        encode_filter_map(&[("vcpu", &vcpu), ("vmm", &vmm), ("api", &api)]),
    )
    .unwrap();
    assert!(SeccompFilters::from_file(&good).unwrap().is_enabled());

    let err = |bytes: Vec<u8>| {
        let path = dir.join("bad.bpf");
        std::fs::write(&path, bytes).unwrap();
        match SeccompFilters::from_file(&path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        }
    };
    let missing = err(encode_filter_map(&[("vmm", &vmm), ("api", &api)]));
    assert!(
        missing.ends_with("needs a filter for each of vmm, api and vcpu"),
        "{missing}"
    );
    let other = err(encode_filter_map(&[
        ("vmm", &vmm),
        ("api", &api),
        ("fc_vcpu", &vcpu),
    ]));
    assert!(other.contains("has a filter for \"fc_vcpu\""), "{other}");
    let mut cut = encode_filter_map(&[("vmm", &vmm), ("api", &api), ("vcpu", &vcpu)]);
    cut.truncate(cut.len() - 3);
    assert!(err(cut).contains("ends early"));
    assert!(err(b"{\"vmm\": {}}".to_vec()).contains("not a filter map"));
    let e = SeccompFilters::from_file(&dir.join("nope.bpf"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("--seccomp-filter ") && e.contains("No such file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_filter_allows_what_only_a_uffd_restore_calls_before_the_filters() {
    // The requests as linux/userfaultfd.h defines them: _IOWR(0xAA, nr, struct).
    #[repr(C)]
    struct UffdioApi([u64; 3]);
    #[repr(C)]
    struct UffdioRegister([u64; 4]);
    ioctl_iowr_nr!(UFFDIO_API, 0xAA, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, 0xAA, 0x00, UffdioRegister);
    let uffd_ioctls = [UFFDIO_API(), UFFDIO_REGISTER()];
    for (kind, filter) in filters() {
        for name in ["userfaultfd", "sendmsg"] {
            assert!(rules(&filter, name).is_empty(), "{kind}: {name}");
        }
        for rule in rules(&filter, "ioctl") {
            let request = rule["args"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["index"] == 1)
                .and_then(|c| c["val"].as_u64());
            assert!(
                request.is_some_and(|r| !uffd_ioctls.contains(&r)),
                "{kind}: ioctl rule {rule} lets a userfaultfd ioctl through"
            );
        }
    }
}
