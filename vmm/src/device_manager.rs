//! Places virtio devices on the MMIO bus: one 4 KiB window and one interrupt line each, from
//! 0xd000_0000 and IRQ 5 up. Each queue's QueueNotify becomes an ioeventfd (datamatch = queue
//! index), the device's interrupt an irqfd, the device itself an event-loop subscriber, and the
//! guest learns about it from `virtio_mmio.device=4K@ADDR:IRQ` on its command line.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kiln_devices::virtio::balloon::Balloon;
use kiln_devices::virtio::block::Block;
use kiln_devices::virtio::mmio::{MMIO_LEN, QUEUE_NOTIFY_OFFSET};
use kiln_devices::virtio::net::Net;
use kiln_devices::virtio::vsock::Vsock;
use kiln_devices::virtio::{MmioTransport, VirtioDevice};
use kvm_ioctls::IoEventAddress;

use crate::arch::layout::IOAPIC_PINS;
use crate::memory::GuestMemoryMmap;
use crate::vstate::exit::IoBuses;
use crate::vstate::vm::{Vm, VmError};

/// First MMIO window for virtio devices (inside the 32-bit gap, below the IOAPIC).
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade and COM ports).
pub const FIRST_DEVICE_IRQ: u32 = 5;

/// The event loop's subscriber type.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No interrupt lines left.
    #[error("no interrupt line left for {0}")]
    NoIrq(String),
    /// KVM refused an irqfd or ioeventfd.
    #[error("{what} for {device}: {err}")]
    Kvm {
        /// The step.
        what: &'static str,
        /// The device.
        device: String,
        /// KVM's error.
        err: kvm_ioctls::Error,
    },
    /// The irqfd could not be registered.
    #[error("interrupt for {0}: {1}")]
    Irq(String, VmError),
    /// The window is already taken.
    #[error("MMIO window for {0}: {1}")]
    Bus(String, kiln_devices::BusError),
}

/// A virtio device by kind, for snapshots.
#[derive(Clone)]
pub enum VirtioKind {
    /// A drive.
    Block(Arc<Mutex<Block>>),
    /// The vsock device.
    Vsock(Arc<Mutex<Vsock>>),
    /// A network interface.
    Net(Arc<Mutex<Net>>),
    /// The memory balloon.
    Balloon(Arc<Mutex<Balloon>>),
}

impl VirtioKind {
    /// The device as its transport sees it.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioKind::Block(d) => d.clone(),
            VirtioKind::Vsock(d) => d.clone(),
            VirtioKind::Net(d) => d.clone(),
            VirtioKind::Balloon(d) => d.clone(),
        }
    }
}

/// A device on the MMIO bus.
pub struct AttachedDevice {
    /// Start of its 4 KiB window.
    pub addr: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// Its register file.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The device itself.
    pub kind: VirtioKind,
}

/// Where a device goes on the bus: the next free window and line, or (on restore) where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The next free window and interrupt line.
    Next,
    /// This window and line (from a snapshot).
    At {
        /// Window start.
        addr: u64,
        /// Interrupt line.
        irq: u32,
    },
}

/// Hands out MMIO windows and interrupt lines, and remembers what the guest must be told.
pub struct MmioDeviceManager {
    next_addr: u64,
    next_irq: u32,
    cmdline: Vec<String>,
    devices: Vec<AttachedDevice>,
}

impl Default for MmioDeviceManager {
    fn default() -> Self {
        Self {
            next_addr: MMIO_DEVICES_START,
            next_irq: FIRST_DEVICE_IRQ,
            cmdline: Vec::new(),
            devices: Vec::new(),
        }
    }
}

/// What attaching a device needs from the VM being built.
pub struct AttachContext<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The buses.
    pub io: &'a mut IoBuses,
    /// The event loop.
    pub events: &'a mut EventManager<Subscriber>,
}

impl MmioDeviceManager {
    /// Attaches `device` (named `name` in errors) to the VM with a fresh transport, or with
    /// `transport` when one was restored.
    pub fn attach(
        &mut self,
        name: &str,
        kind: VirtioKind,
        placement: Placement,
        transport: Option<MmioTransport>,
        ctx: &mut AttachContext<'_>,
    ) -> Result<(), DeviceError> {
        match kind.clone() {
            VirtioKind::Block(d) => self.attach_device(name, d, kind, placement, transport, ctx),
            VirtioKind::Vsock(d) => self.attach_device(name, d, kind, placement, transport, ctx),
            VirtioKind::Net(d) => self.attach_device(name, d, kind, placement, transport, ctx),
            VirtioKind::Balloon(d) => self.attach_device(name, d, kind, placement, transport, ctx),
        }
    }

    fn attach_device<D>(
        &mut self,
        name: &str,
        device: Arc<Mutex<D>>,
        kind: VirtioKind,
        placement: Placement,
        transport: Option<MmioTransport>,
        ctx: &mut AttachContext<'_>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (addr, irq) = match placement {
            Placement::Next => (self.next_addr, self.next_irq),
            Placement::At { addr, irq } => (addr, irq),
        };
        if !(FIRST_DEVICE_IRQ..u32::from(IOAPIC_PINS)).contains(&irq) {
            return Err(DeviceError::NoIrq(name.into()));
        }
        let (vm, io, events) = (ctx.vm, &mut *ctx.io, &mut *ctx.events);
        {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            vm.register_irqfd(dev.interrupt().irqfd(), irq)
                .map_err(|e| DeviceError::Irq(name.into(), e))?;
            for (index, evt) in dev.queue_events().iter().enumerate() {
                vm.fd()
                    .register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                        index as u32,
                    )
                    .map_err(|err| DeviceError::Kvm {
                        what: "queue ioeventfd",
                        device: name.into(),
                        err,
                    })?;
            }
        }
        let transport =
            Arc::new(Mutex::new(transport.unwrap_or_else(|| {
                MmioTransport::new(device.clone(), ctx.mem.clone())
            })));
        io.mmio
            .insert(transport.clone(), addr, MMIO_LEN)
            .map_err(|e| DeviceError::Bus(name.into(), e))?;
        events.add_subscriber(device);
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
        self.next_addr = self.next_addr.max(addr + MMIO_LEN);
        self.next_irq = self.next_irq.max(irq + 1);
        self.devices.push(AttachedDevice {
            addr,
            irq,
            transport,
            kind,
        });
        Ok(())
    }

    /// The network interface `id`, if attached.
    pub fn net(&self, id: &str) -> Option<&Arc<Mutex<Net>>> {
        self.devices.iter().find_map(|d| match &d.kind {
            VirtioKind::Net(n) if n.lock().unwrap_or_else(|p| p.into_inner()).id() == id => Some(n),
            _ => None,
        })
    }

    /// The balloon, if there is one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.devices.iter().find_map(|d| match &d.kind {
            VirtioKind::Balloon(b) => Some(b),
            _ => None,
        })
    }

    /// The attached devices, in attachment order.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// Puts the boot timer in the first MMIO window, where Firecracker's guests write to it
    /// (`--boot-timer`); virtio devices then start at the next window. Call before attaching
    /// any virtio device.
    pub fn attach_boot_timer(
        &mut self,
        io: &mut IoBuses,
        timer: kiln_devices::pseudo::BootTimer,
    ) -> Result<(), DeviceError> {
        io.mmio
            .insert(Arc::new(Mutex::new(timer)), MMIO_DEVICES_START, MMIO_LEN)
            .map_err(|e| DeviceError::Bus("the boot timer".into(), e))?;
        self.next_addr = self.next_addr.max(MMIO_DEVICES_START + MMIO_LEN);
        Ok(())
    }

    /// Records a command-line entry as if a device had been attached (for tests of callers).
    #[cfg(test)]
    pub fn add_cmdline_for_test(&mut self, entry: &str) {
        self.cmdline.push(entry.into());
    }

    /// What the guest's command line needs so it finds the devices.
    pub fn cmdline_args(&self) -> String {
        self.cmdline.join(" ")
    }
}
