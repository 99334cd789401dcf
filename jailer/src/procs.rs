//! What a process in a cgroup is, as `kiln-jailer --cleanup` needs to know: a user process (the
//! VMM, which must be stopped first), a kernel thread (KVM's per-VM worker, which leaves on its
//! own), or already gone.

use std::io;

/// What a process listed in a cgroup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// A user process (or one that cannot be told apart from one).
    User,
    /// A kernel thread, with its name.
    KernelThread(String),
    /// It has exited since the cgroup was read.
    Gone,
}

/// Tells what a process is; the kernel's `/proc` in the binary, a stand-in in tests.
pub trait Processes: Sync {
    /// What process `pid` (as listed in `cgroup.procs`) is.
    fn member(&self, pid: &str) -> Member;
}

/// The kernel's process table, read through `/proc`.
pub struct ProcFs;

/// The one [`ProcFs`].
pub static PROC_FS: ProcFs = ProcFs;

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

impl Processes for ProcFs {
    fn member(&self, pid: &str) -> Member {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => parse_stat(&stat),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Member::Gone,
            Err(_) => Member::User,
        }
    }
}

/// What a `/proc/PID/stat` line says the process is: `PID (COMM) STATE PPID PGRP SESSION TTY
/// TPGID FLAGS ...`; COMM may hold spaces and parentheses, so the last `)` ends it.
fn parse_stat(stat: &str) -> Member {
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return Member::User;
    };
    let comm = head.split_once('(').map_or("", |(_, c)| c);
    let flags = rest
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok());
    match flags {
        Some(f) if f & PF_KTHREAD != 0 => Member::KernelThread(comm.to_string()),
        _ => Member::User,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_tell_kernel_threads_from_processes() {
        let kthread = "150 (kvm-nx-lpage-recovery-143) S 2 0 0 0 -1 2129984 0 0 0 0";
        assert_eq!(
            parse_stat(kthread),
            Member::KernelThread("kvm-nx-lpage-recovery-143".into())
        );
        let vmm = "143 (kiln (vmm) x) S 1 143 143 0 -1 4194560 0 0 0 0";
        assert_eq!(parse_stat(vmm), Member::User);
        assert_eq!(parse_stat("garbage"), Member::User);
        assert_eq!(
            PROC_FS.member(&std::process::id().to_string()),
            Member::User,
            "this test is a user process"
        );
        assert_eq!(PROC_FS.member("2"), Member::KernelThread("kthreadd".into()));
        assert_eq!(PROC_FS.member("999999999"), Member::Gone);
    }
}
