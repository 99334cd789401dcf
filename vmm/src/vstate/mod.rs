//! KVM state: the VM (memory slots, in-kernel irqchip and PIT) and its vCPUs (configuration and the
//! thread that runs each one), plus the pure exit handling they share.

pub mod exit;
pub mod vcpu;
pub mod vcpu_state;
pub mod vcpu_thread;
pub mod vm;
pub mod vm_state;
