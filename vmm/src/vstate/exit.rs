//! What a vCPU exit means: [`handle_exit`] is a plain function from a KVM exit to an action, so the
//! rules can be tested without KVM. [`ExitSignal`] carries the first reason the VM must stop from any
//! thread (a vCPU, a device) to the event loop.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use kiln_devices::Bus;

use crate::metrics::VCPU;
use kvm_ioctls::VcpuExit;
use vmm_sys_util::eventfd::EventFd;

/// `KVM_SYSTEM_EVENT_*` types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// The port-I/O and MMIO buses a vCPU dispatches to; built once, shared read-only.
#[derive(Default, Clone)]
pub struct IoBuses {
    /// Port I/O (16-bit port numbers).
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset line or a KVM reset event): Kiln's clean exit.
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// A vCPU triple-faulted.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Its registers at the fault (`; guest RIP ...`), or empty when they could not be read.
        state: String,
    },
    /// KVM could not emulate or run the guest.
    InternalError {
        /// The vCPU.
        vcpu: u8,
        /// What KVM said, with the guest's RIP when known.
        detail: String,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// The hardware's entry-failure reason.
        reason: u64,
    },
    /// An exit the VMM does not expect from a guest.
    Unexpected {
        /// The vCPU.
        vcpu: u8,
        /// The exit's name.
        exit: String,
    },
    /// The VMM itself failed.
    Vmm(String),
}

impl ExitReason {
    /// True for the guest's own reset or power-off.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::GuestReset | ExitReason::GuestShutdown)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest reset the machine"),
            ExitReason::GuestShutdown => write!(f, "the guest powered off"),
            ExitReason::TripleFault { vcpu, state } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN){state}")
            }
            ExitReason::InternalError { vcpu, detail } => {
                write!(f, "KVM internal error on vCPU {vcpu}: {detail}")
            }
            ExitReason::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM could not enter vCPU {vcpu}: hardware entry failure reason {reason:#x}"
                )
            }
            ExitReason::Unexpected { vcpu, exit } => {
                write!(f, "vCPU {vcpu} made an unexpected exit: {exit}")
            }
            ExitReason::Vmm(msg) => write!(f, "{msg}"),
        }
    }
}

/// The first reason to stop, and an eventfd that wakes the event loop when it is set.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal with nothing requested yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another reason came first, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            self.stopping.store(true, Ordering::SeqCst);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot wake the event loop to stop the VM: {e}");
            }
        }
    }

    /// True once a reason has been recorded: vCPUs stop running the guest.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the event loop waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What the vCPU thread does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuAction {
    /// Run the guest again.
    Continue,
    /// Stop this vCPU and the VM for this reason.
    Stop(ExitReason),
}

/// Handles one exit of vCPU `vcpu`. Reads nobody claims answer all-ones, like an empty ISA bus;
/// writes nobody claims are dropped.
pub fn handle_exit(exit: VcpuExit<'_>, io: &IoBuses, vcpu: u8) -> VcpuAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            VCPU.exit_io_in.inc();
            if !io.pio.read(u64::from(port), data) {
                log::debug!("vCPU {vcpu}: read of unclaimed port {port:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            VCPU.exit_io_out.inc();
            if !io.pio.write(u64::from(port), data) {
                log::debug!("vCPU {vcpu}: write to unclaimed port {port:#x}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            VCPU.exit_mmio_read.inc();
            if !io.mmio.read(addr, data) {
                log::debug!("vCPU {vcpu}: read of unclaimed MMIO address {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            VCPU.exit_mmio_write.inc();
            if !io.mmio.write(addr, data) {
                log::debug!("vCPU {vcpu}: write to unclaimed MMIO address {addr:#x}");
            }
        }
        VcpuExit::Shutdown => {
            VCPU.failures.inc();
            return VcpuAction::Stop(ExitReason::TripleFault {
                vcpu,
                state: String::new(),
            });
        }
        VcpuExit::InternalError => {
            VCPU.failures.inc();
            return VcpuAction::Stop(ExitReason::InternalError {
                vcpu,
                detail: String::new(),
            });
        }
        VcpuExit::FailEntry(reason, _) => {
            VCPU.failures.inc();
            return VcpuAction::Stop(ExitReason::FailEntry { vcpu, reason });
        }
        VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN, _) => {
            return VcpuAction::Stop(ExitReason::GuestShutdown);
        }
        VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, _) => {
            return VcpuAction::Stop(ExitReason::GuestReset);
        }
        // A signal kicked the vCPU out of the guest; the run loop looks at why.
        VcpuExit::Intr => {}
        other => {
            return VcpuAction::Stop(ExitReason::Unexpected {
                vcpu,
                exit: format!("{other:?}"),
            });
        }
    }
    VcpuAction::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_devices::BusDevice;
    use std::sync::Arc;

    struct Echo(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn buses() -> (IoBuses, Arc<Mutex<Echo>>, Arc<Mutex<Echo>>) {
        let port = Arc::new(Mutex::new(Echo(Vec::new())));
        let mmio = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut io = IoBuses::default();
        io.pio.insert(port.clone(), 0x3f8, 8).unwrap();
        io.mmio.insert(mmio.clone(), 0xd000_0000, 0x1000).unwrap();
        (io, port, mmio)
    }

    #[test]
    fn port_io_reaches_the_device_at_its_offset() {
        let (io, port, _) = buses();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut data), &io, 0),
            VcpuAction::Continue
        );
        assert_eq!(data, [0x45]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &io, 0),
            VcpuAction::Continue
        );
        assert_eq!(port.lock().unwrap().0, vec![(0, b"A".to_vec())]);
    }

    #[test]
    fn mmio_reaches_the_device_and_unclaimed_reads_are_all_ones() {
        let (io, _, mmio) = buses();
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0010, &mut data), &io, 1);
        assert_eq!(data, [0x50; 4]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0ffc, &[1, 2, 3, 4]), &io, 1);
        assert_eq!(mmio.lock().unwrap().0, vec![(0xffc, vec![1, 2, 3, 4])]);
        let mut data = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xe000_0000, &mut data), &io, 1),
            VcpuAction::Continue
        );
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x80, &mut data), &io, 1);
        assert_eq!(data, [0xff; 2]);
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x80, &[0]), &io, 1),
            VcpuAction::Continue
        );
    }

    #[test]
    fn fatal_exits_stop_with_a_reason() {
        let (io, _, _) = buses();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &io, 3),
            VcpuAction::Stop(ExitReason::TripleFault {
                vcpu: 3,
                state: String::new()
            })
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x21, 0), &io, 0),
            VcpuAction::Stop(ExitReason::FailEntry {
                vcpu: 0,
                reason: 0x21
            })
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(2, &[]), &io, 0),
            VcpuAction::Stop(ExitReason::GuestReset)
        );
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(1, &[]), &io, 0),
            VcpuAction::Stop(ExitReason::GuestShutdown)
        );
        assert!(matches!(
            handle_exit(VcpuExit::SystemEvent(3, &[]), &io, 0),
            VcpuAction::Stop(ExitReason::Unexpected { .. })
        ));
        assert!(matches!(
            handle_exit(VcpuExit::Hlt, &io, 0),
            VcpuAction::Stop(ExitReason::Unexpected { .. })
        ));
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &io, 0),
            VcpuAction::Stop(ExitReason::InternalError { .. })
        ));
        assert_eq!(handle_exit(VcpuExit::Intr, &io, 0), VcpuAction::Continue);
    }

    #[test]
    fn first_exit_reason_wins() {
        let signal = ExitSignal::new().unwrap();
        assert!(!signal.is_stopping());
        signal.request(ExitReason::GuestReset);
        signal.request(ExitReason::TripleFault {
            vcpu: 0,
            state: String::new(),
        });
        assert!(signal.is_stopping());
        assert_eq!(signal.reason(), Some(ExitReason::GuestReset));
        assert_eq!(signal.eventfd().read().unwrap(), 1);
        assert!(ExitReason::GuestReset.is_clean());
        assert!(
            !ExitReason::TripleFault {
                vcpu: 0,
                state: String::new()
            }
            .is_clean()
        );
    }
}
