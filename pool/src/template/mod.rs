//! Templates: a spec ([`spec`]) becomes a root filesystem image with the agent ([`rootfs`], from a
//! folder, an image, an OCI image ([`oci`]) or Debian packages ([`debian`])), build steps run in a
//! booted VM, and a Full snapshot of the VM left running its start command ([`build`]). Each is
//! stored by its content key: the spec, a fingerprint of its source, and the agent and kernel it
//! was built with. The same inputs always give the same key, so a rebuild is a lookup.

#[cfg(feature = "daemon")]
pub mod build;
#[cfg(feature = "daemon")]
pub mod debian;
#[cfg(feature = "daemon")]
pub mod oci;
#[cfg(feature = "daemon")]
pub mod rootfs;
pub mod spec;
#[cfg(feature = "daemon")]
mod store;
#[cfg(feature = "daemon")]
pub use store::*;
