//! Kiln's fuzz targets: one function per thing an untrusted party sends, each taking raw bytes.
//!
//! - Guest side: each virtio device's queue handling over guest memory the input fills
//!   ([`blk_queue`], [`vsock_queue`], [`balloon_queue`], [`net_queue`]), and sequences of MMIO
//!   register accesses ([`mmio`]).
//! - Client side: the API's HTTP reader fed in arbitrary pieces ([`http_request`]) and every API
//!   body on every route ([`api_body`]).
//! - Files: a snapshot state file with a right header and CRC around any payload
//!   ([`snapshot_state`]).
//! - The agent protocol: frames and messages as either end decodes them ([`agent_frames`]), and
//!   the post-restore request's rules ([`agent_restore`]).
//!
//! A target must never panic, hang or allocate without bound, whatever the bytes. They run as
//! bounded property tests under `cargo test` (bolero, `tests/targets.rs`, the corpora in
//! `corpus/<target>/` first) and under libFuzzer for depth (`cargo xtask fuzz [TARGET]
//! [--seconds N]`). A device added later gets a target here in the shape of
//! [`blk_queue`]: build it over [`guest::Memory`], hand it queues laid out by the input, and run
//! its event handler through [`guest::drive`].
//!
//! This crate may call every Kiln crate; nothing calls it but its tests and its binary.

pub mod guest;
mod targets;

pub use targets::*;

/// A fuzz target: raw bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target, by name, as `cargo xtask fuzz` and the tests call them.
pub const TARGETS: &[(&str, Target)] = &[
    ("blk_queue", blk_queue),
    ("vsock_queue", vsock_queue),
    ("balloon_queue", balloon_queue),
    ("net_queue", net_queue),
    ("mmio", mmio),
    ("http_request", http_request),
    ("api_body", api_body),
    ("snapshot_state", snapshot_state),
    ("agent_frames", agent_frames),
    ("agent_restore", agent_restore),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
