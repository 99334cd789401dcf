//! `kiln-vmm`: one hypervisor process per microVM.
//!
//! This crate owns the VM: its configuration ([`config`]), guest memory ([`memory`]), kernel loading
//! ([`loader`]), the x86_64 boot state ([`arch`]), KVM objects and vCPU threads ([`vstate`]), the
//! construction order ([`builder`]), the event loop ([`vmm`]), the VMM side of the API socket
//! ([`api`]) and each thread's seccomp filter ([`seccomp`]). It calls `kiln-devices` for
//! everything the guest touches and the rust-vmm crates for KVM, memory and loading. The
//! `kiln-vmm` binary (`main.rs`) calls it; later the API server and the jailer will too.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod instance;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod mmds;
pub mod persist;
pub mod seccomp;
pub mod signals;
pub mod vmm;
pub mod vstate;

pub use vmm::Vmm;
