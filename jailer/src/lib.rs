//! `kiln-jailer`: starts `kiln-vmm` (or any exec file) in a jail, after Firecracker's jailer.
//!
//! This crate owns the jail: its command line ([`args`]), the jail directory and what is copied
//! into it ([`jail`], [`libs`]), inherited state ([`env`]), the network namespace ([`netns`]),
//! resource limits ([`rlimit`]), cgroups v1 and v2 ([`cgroup`]), the mount namespace, root and
//! device nodes ([`chroot`]), the privilege drop ([`privs`]) and the PID namespace and exec
//! ([`launch`]); [`undo`] takes back what a failed run built and [`cleanup`] removes a finished
//! jail ([`procs`] tells it a VMM from KVM's kernel threads). It calls only libc; the
//! `kiln-jailer` binary (`main.rs`) runs the steps in order, and the
//! VMM it starts knows nothing about it.

pub mod args;
pub mod cgroup;
pub mod chroot;
pub mod cleanup;
pub mod dirfd;
pub mod env;
pub mod jail;
pub mod launch;
pub mod libs;
pub mod netns;
pub mod privs;
pub mod procs;
pub mod rlimit;
pub mod sys;
pub mod undo;
