//! Builds a VM from a validated configuration. Construction order lives here and nowhere else:
//! console output, KVM and memory, the irqchip, kernel + initrd + command line, boot tables,
//! devices on the bus, then the vCPUs.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use kiln_devices::BusError;
use kiln_devices::legacy::{
    COM1_IRQ, COM1_LEN, COM1_PORT, ConsoleInput, I8042, I8042_KBD_IRQ, I8042_LEN, I8042_PORT,
    SerialDevice, SerialDeviceState, SerialRestoreArgs,
};
use kiln_devices::virtio::balloon::{Balloon, BalloonError};
use kiln_devices::virtio::block::{Block, BlockError};
use kiln_devices::virtio::net::{Net, NetError};
use kiln_devices::virtio::vsock::{Vsock, VsockError};
use kiln_snapshot::Persist;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, BootError, BootInfo};
use crate::arch::mptable::{self, MptableError};
use crate::config::VmConfig;
use crate::device_manager::{
    AttachContext, DeviceError, MmioDeviceManager, Placement, Subscriber, VirtioKind,
};
use crate::loader::{self, BootEntry, LoaderError};
use crate::memory::free_pages::FreePages;
use crate::memory::{self, GuestMemoryMmap, MemoryError, low_ram_end};
use crate::vmm::{ExitWatcher, Vmm, VmmParts};
use crate::vstate::exit::{ExitReason, ExitSignal, IoBuses};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM refused a VM-level step.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot parameters could not be written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The serial output file could not be opened.
    #[error("serial output {path}: {err}")]
    SerialOut {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// KVM's supported CPUID could not be read.
    #[error("cannot read KVM's supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for {0}: {1}")]
    EventFd(&'static str, std::io::Error),
    /// A device could not be placed on a bus.
    #[error("cannot place the {0} on the I/O bus: {1}")]
    Bus(&'static str, BusError),
    /// The event loop could not be created.
    #[error("cannot create the event loop: {0}")]
    EventLoop(String),
    /// A drive could not be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A network interface could not be created (its TAP, say).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The balloon could not be created.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Saved state could not be put back.
    #[error("{0}")]
    Restore(String),
}

impl BuildError {
    /// True when the error is in what the user gave (a file), not in the host or KVM.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            BuildError::Loader(_)
                | BuildError::SerialOut { .. }
                | BuildError::Block(_)
                | BuildError::Vsock(_)
                | BuildError::Net(_)
                | BuildError::Balloon(BalloonError::TooLarge { .. })
        )
    }
}

/// Console output over its byte budget is dropped and counted, as Firecracker's rate-limited
/// serial console does, so a guest printing in a loop cannot fill the host's disk.
struct LimitedOutput {
    inner: Box<dyn std::io::Write + Send>,
    bucket: kiln_devices::rate_limiter::TokenBucket,
    clock: kiln_devices::rate_limiter::MonotonicClock,
    dropped: u64,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use kiln_devices::rate_limiter::Clock;
        let now = self.clock.now();
        if !self.bucket.ready(now) {
            if self.dropped == 0 {
                log::warn!("serial console: output over its rate limit is dropped");
            }
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        // What is written may leave the bucket in debt: later output waits it out.
        self.bucket.consume(now, buf.len() as u64);
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn serial_output(config: &VmConfig) -> Result<Box<dyn std::io::Write + Send>, BuildError> {
    use kiln_devices::rate_limiter::Clock;
    let out = serial_sink(config)?;
    let clock = kiln_devices::rate_limiter::MonotonicClock::default();
    let bucket = config.serial.rate_limiter.and_then(|b| {
        kiln_devices::rate_limiter::TokenBucket::new(
            crate::config::rate_limiter::bucket(&b),
            clock.now(),
        )
    });
    Ok(match bucket {
        Some(bucket) => Box::new(LimitedOutput {
            inner: out,
            bucket,
            clock,
            dropped: 0,
        }),
        None => out,
    })
}

fn serial_sink(config: &VmConfig) -> Result<Box<dyn std::io::Write + Send>, BuildError> {
    match &config.serial.serial_out_path {
        // Capped, keeping the tail: a guest printing in a loop must not fill the host's disk.
        // Read and write: the tail is read back when the cap is reached.
        Some(path) => File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map(|f| {
                Box::new(kiln_devices::legacy::ConsoleLog::new(
                    f,
                    kiln_devices::legacy::CONSOLE_LOG_CAP,
                )) as Box<dyn std::io::Write + Send>
            })
            .map_err(|err| BuildError::SerialOut {
                path: path.clone(),
                err,
            }),
        // An unbuffered handle on fd 1: console bytes reach a reader as the guest writes them.
        None => std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map(|fd| Box::new(File::from(fd)) as Box<dyn std::io::Write + Send>)
            .map_err(|err| BuildError::SerialOut {
                path: "stdout".into(),
                err,
            }),
    }
}

/// The VMM's stdin as console input, when it is something that can be waited on (a terminal or a
/// pipe; /dev/null and regular files cannot, and then the console has no input).
fn console_input() -> Option<File> {
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    // SAFETY: fstat on a descriptor we own, into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is valid for the duration of the call and st is a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return None;
    }
    let kind = st.st_mode & libc::S_IFMT;
    (kind == libc::S_IFIFO || kind == libc::S_IFSOCK || (kind == libc::S_IFCHR && is_tty(&fd)))
        .then(|| File::from(fd))
}

fn is_tty(fd: &impl AsRawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// The guest's command line: the configured one, the root device, then the virtio devices. Kiln's
/// additions go before a `--`, since everything after it is for init.
fn guest_cmdline(config: &VmConfig, devices: &MmioDeviceManager) -> String {
    let args = crate::config::boot_args(&config.boot_source);
    let (kernel_part, init_part) = match args.split_once(" -- ") {
        Some((k, i)) => (k.to_string(), Some(i)),
        None if args.starts_with("-- ") => (String::new(), Some(&args[3..])),
        None => (args.to_string(), None),
    };
    let mut words = vec![kernel_part];
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        let dev = match &root.partuuid {
            Some(uuid) => format!("PARTUUID={uuid}"),
            None => "/dev/vda".into(),
        };
        let mode = if root.is_read_only { "ro" } else { "rw" };
        words.push(format!("root={dev} {mode}"));
    }
    words.push(devices.cmdline_args());
    if let Some(init) = init_part {
        words.push(format!("-- {init}"));
    }
    words.retain(|w| !w.is_empty());
    words.join(" ")
}

/// Creates each drive (the root device first, so it is /dev/vda) and attaches it.
fn attach_drives(
    config: &VmConfig,
    devices: &mut MmioDeviceManager,
    ctx: &mut AttachContext<'_>,
) -> Result<(), BuildError> {
    let (roots, others): (Vec<_>, Vec<_>) = config.drives.iter().partition(|d| d.is_root_device);
    for d in roots.into_iter().chain(others) {
        let irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| BuildError::EventFd("a drive's IRQ", e))?;
        let cfg = crate::config::drive::device_config(d);
        let block = Arc::new(Mutex::new(Block::new(cfg, irq)?));
        devices.attach(
            &format!("drive {}", d.drive_id),
            VirtioKind::Block(block),
            Placement::Next,
            None,
            ctx,
        )?;
    }
    Ok(())
}

/// The free-page record of `mem`, reading KVM's dirty log when `logged`.
pub(crate) fn free_pages(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    logged: bool,
) -> Result<Arc<FreePages>, BuildError> {
    let log = if logged {
        Some(vm.dirty_log_reader(mem)?)
    } else {
        None
    };
    Ok(Arc::new(FreePages::new(mem.clone(), log)))
}

/// Creates the balloon `config` asks for, if any, and attaches it; the pages it frees go to
/// `pages`.
pub(crate) fn attach_balloon(
    config: &VmConfig,
    pages: &Arc<FreePages>,
    devices: &mut MmioDeviceManager,
    ctx: &mut AttachContext<'_>,
) -> Result<(), BuildError> {
    let Some(b) = &config.balloon else {
        return Ok(());
    };
    let irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::EventFd("the balloon IRQ", e))?;
    let balloon = Balloon::new(
        device_config(b),
        config.machine.mem_size_mib as u64,
        pages.clone(),
        irq,
    )?;
    devices.attach(
        "balloon",
        VirtioKind::Balloon(Arc::new(Mutex::new(balloon))),
        Placement::Next,
        None,
        ctx,
    )?;
    Ok(())
}

/// The device's view of the API's `balloon` object.
pub(crate) fn device_config(
    b: &crate::config::BalloonConfig,
) -> kiln_devices::virtio::balloon::BalloonConfig {
    kiln_devices::virtio::balloon::BalloonConfig {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_polling_interval_s,
        free_page_reporting: b.free_page_reporting,
    }
}

/// Attaches each network interface (the first is the guest's eth0), each on its TAP.
/// An interface `mmds/config` names answers the MMDS address itself (see [`crate::mmds`]).
fn attach_nets(
    config: &VmConfig,
    instance: &crate::instance::Instance,
    devices: &mut MmioDeviceManager,
    ctx: &mut AttachContext<'_>,
) -> Result<(), BuildError> {
    for n in &config.network_interfaces {
        let irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| BuildError::EventFd("a network interface's IRQ", e))?;
        let mut net = Net::new(crate::config::net::device_config(n), irq)?;
        let mmds_config = instance.mmds_config.as_ref();
        if let Some(hook) = crate::mmds::hook_for(&n.iface_id, mmds_config, &instance.mmds) {
            net.set_frame_hook(Box::new(hook));
        }
        devices.attach(
            &format!("network interface {}", n.iface_id),
            VirtioKind::Net(Arc::new(Mutex::new(net))),
            Placement::Next,
            None,
            ctx,
        )?;
    }
    Ok(())
}

/// The boot timer's hook: logs the boot time as Firecracker does, measured from `started`.
fn boot_timer(started: crate::instance::Timestamp) -> kiln_devices::pseudo::BootTimer {
    kiln_devices::pseudo::BootTimer::new(Box::new(move || {
        let now = crate::instance::Timestamp::now();
        let us = now.wall_us.saturating_sub(started.wall_us);
        let cpu_us = now.cpu_us.saturating_sub(started.cpu_us);
        log::info!(
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            us,
            us / 1000,
            cpu_us,
            cpu_us / 1000
        );
    }))
}

/// A KVM VM with its irqchip and PIT, no memory yet: what does not depend on the configuration,
/// so a VMM waiting for its configuration or snapshot can make it ahead ([`crate::api::preboot`]).
pub fn prepare_vm() -> Result<Vm, VmError> {
    let vm = Vm::new()?;
    vm.setup_irqchip()?;
    Ok(vm)
}

/// The KVM VM over `mem` (logging dirty pages when `track_dirty`): `prepared` (from
/// [`prepare_vm`]) when there is one, else a new one.
pub(crate) fn create_vm(
    prepared: Option<Vm>,
    mem: &GuestMemoryMmap,
    track_dirty: bool,
) -> Result<Vm, BuildError> {
    let vm = match prepared {
        Some(vm) => vm,
        None => prepare_vm()?,
    };
    vm.register_memory(mem, track_dirty)?;
    Ok(vm)
}

/// The parts every VM has, whether booted or restored: KVM with memory and the irqchip, the event
/// loop and exit signal, COM1 (with console input) and the i8042 on the port bus.
pub(crate) struct Platform {
    pub(crate) vm: Vm,
    pub(crate) events: EventManager<Subscriber>,
    pub(crate) signal: Arc<ExitSignal>,
    pub(crate) io: IoBuses,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// Kept beside its place on the bus so the API can press Ctrl-Alt-Del.
    pub(crate) i8042: Arc<Mutex<I8042>>,
}

impl Platform {
    /// Adds the event loop and the legacy devices to `vm` (see [`create_vm`]); the UART starts
    /// from `serial_state` when restoring. Interrupt lines are connected here, so on a restore
    /// this comes after the vCPUs and the irqchip got their saved state: an interrupt the saved
    /// UART raises again must land in the restored irqchip, not be overwritten by it.
    pub(crate) fn new(
        vm: Vm,
        config: &VmConfig,
        serial_state: Option<&SerialDeviceState>,
    ) -> Result<Self, BuildError> {
        let serial_out = serial_output(config)?;
        let mut events = EventManager::<Subscriber>::new()
            .map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
        let signal =
            Arc::new(ExitSignal::new().map_err(|e| BuildError::EventFd("the exit signal", e))?);
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(signal.clone()))));
        let evt = |what| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::EventFd(what, e));
        let serial_irq = evt("the serial IRQ")?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let drained = evt("the serial console")?;
        let drained_for_uart = drained
            .try_clone()
            .map_err(|e| BuildError::EventFd("the serial console", e))?;
        let uart = match serial_state {
            None => SerialDevice::new(serial_irq, serial_out, drained_for_uart),
            Some(state) => SerialDevice::restore(
                SerialRestoreArgs {
                    irq: serial_irq,
                    out: serial_out,
                    drained: drained_for_uart,
                },
                state,
            )
            .map_err(BuildError::Restore)?,
        };
        let serial = Arc::new(Mutex::new(uart));
        if let Some(stdin) = console_input() {
            events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                serial.clone(),
                stdin,
                drained,
            ))));
        }
        let kbd_irq = evt("the keyboard IRQ")?;
        vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)?;
        let reset_signal = signal.clone();
        let i8042 = Arc::new(Mutex::new(I8042::new(
            kbd_irq,
            Box::new(move || reset_signal.request(ExitReason::GuestReset)),
        )));
        let mut io = IoBuses::default();
        io.pio
            .insert(serial.clone(), COM1_PORT, COM1_LEN)
            .map_err(|e| BuildError::Bus("serial port", e))?;
        io.pio
            .insert(i8042.clone(), I8042_PORT, I8042_LEN)
            .map_err(|e| BuildError::Bus("i8042", e))?;
        Ok(Self {
            vm,
            events,
            signal,
            io,
            serial,
            i8042,
        })
    }

    /// What attaching a virtio device needs.
    pub(crate) fn attach_context<'a>(&'a mut self, mem: &'a GuestMemoryMmap) -> AttachContext<'a> {
        AttachContext {
            vm: &self.vm,
            mem,
            io: &mut self.io,
            events: &mut self.events,
        }
    }
}

/// Builds the VM `config` describes; `config` must have passed [`VmConfig::validate`].
pub fn build(config: &VmConfig, instance: &crate::instance::Instance) -> Result<Vmm, BuildError> {
    build_in(config, None, instance)
}

/// [`build`] in the KVM VM `prepared` made ahead, if any.
pub fn build_in(
    config: &VmConfig,
    prepared: Option<Vm>,
    instance: &crate::instance::Instance,
) -> Result<Vmm, BuildError> {
    // As Firecracker, the boot timer measures from the start of the build to the guest's signal.
    let build_started = crate::instance::Timestamp::now();
    let mem_size = (config.machine.mem_size_mib as u64) << 20;
    let vcpu_count = config.machine.vcpu_count;
    let (mem, memfd) = memory::create_with(mem_size, config.machine.huge_pages)?;
    // KVM logs the guest's writes only for diff snapshots; the balloon's free-page record does
    // without (see memory::free_pages).
    let logged = config.machine.track_dirty_pages;
    let vm = create_vm(prepared, &mem, logged)?;
    let pages = free_pages(&vm, &mem, logged)?;
    let mut platform = Platform::new(vm, config, None)?;
    log::info!(
        "VM created with {} MiB of memory",
        config.machine.mem_size_mib
    );

    let mut devices = MmioDeviceManager::default();
    if instance.boot_timer {
        devices.attach_boot_timer(&mut platform.io, boot_timer(build_started))?;
    }
    let mut ctx = platform.attach_context(&mem);
    attach_drives(config, &mut devices, &mut ctx)?;
    attach_nets(config, instance, &mut devices, &mut ctx)?;
    if let Some(v) = &config.vsock {
        let irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| BuildError::EventFd("the vsock IRQ", e))?;
        let vsock = Arc::new(Mutex::new(Vsock::new(
            u64::from(v.guest_cid),
            v.uds_path.clone(),
            irq,
        )?));
        devices.attach(
            "vsock",
            VirtioKind::Vsock(vsock),
            Placement::Next,
            None,
            &mut ctx,
        )?;
    }
    attach_balloon(config, &pages, &mut devices, &mut ctx)?;

    let kernel = loader::load_kernel(&mem, &config.boot_source.kernel_image_path)?;
    let initrd = match &config.boot_source.initrd_path {
        Some(path) => Some(loader::load_initrd(&mem, path, low_ram_end(mem_size))?),
        None => None,
    };
    let cmdline = guest_cmdline(config, &devices);
    let cmdline_size = loader::load_cmdline(&mem, &cmdline)?;
    mptable::write(&mem, vcpu_count)?;
    let info = BootInfo {
        initrd,
        cmdline_size,
        mem_size,
    };
    match kernel.entry {
        BootEntry::Pvh(_) => boot::write_pvh_info(&mem, &info)?,
        BootEntry::Linux64(_) => boot::write_zero_page(&mem, &info, kernel.setup_header)?,
    }
    log::info!(
        "kernel, initrd and boot tables loaded; entry {:?}; cmdline {cmdline:?}",
        kernel.entry
    );

    let vm = &platform.vm;
    let supported = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::Cpuid)?;
    let host = vm.host_caps();
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for id in 0..vcpu_count {
        let vcpu = Vcpu::new(vm, id)?;
        vcpu.configure(
            &supported,
            host,
            vcpu_count,
            config.machine.smt,
            &mem,
            &kernel.entry,
        )?;
        vcpus.push(vcpu);
    }
    log::info!("{vcpu_count} vCPUs configured");
    Ok(Vmm::new(VmmParts {
        platform,
        mem,
        memfd: Some(memfd),
        page_fault_handler: None,
        pages,
        vcpus,
        devices,
        config: config.clone(),
        track_dirty: config.machine.track_dirty_pages,
        paused_clock: None,
        clock_realtime: false,
    }))
}

#[cfg(test)]
#[path = "builder_tests.rs"]
mod tests;
