//! A built VM and its event loop: start the vCPU threads, then wait on `event-manager` until
//! something asks the VM to stop, answering API requests between events.
//!
//! While the VM is paused the device event loop is not run at all, so device work is quiesced
//! with the vCPUs: nothing reads host sockets or writes guest memory until the VM resumes (the
//! epoll registrations are level-triggered, so whatever arrived meanwhile is handled then). Only
//! the API and the exit signal are watched while paused.
//!
//! The VMM thread installs its seccomp filter in [`Vmm::run`], once the vCPU threads exist (they
//! start paused and install their own) and before any of them runs the guest
//! ([`crate::seccomp`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use kiln_api::requests::network_interfaces::NetworkInterfaceUpdate;
use kiln_devices::legacy::{I8042, I8042Error};
use kvm_bindings::kvm_clock_data;

use crate::api::ApiLink;
use crate::builder::{BuildError, Platform, build};
use crate::config::VmConfig;
use crate::device_manager::{MmioDeviceManager, Subscriber};
use crate::memory::GuestMemoryMmap;
use crate::memory::free_pages::FreePages;
use crate::persist::uffd::PageFaultHandler;
use crate::seccomp::{SeccompFilters, ThreadKind};
use crate::vstate::exit::{ExitReason, ExitSignal, IoBuses};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vcpu_state::saveable_msrs;
use crate::vstate::vcpu_thread::VcpuHandle;
use crate::vstate::vm::Vm;

/// What a built (or restored) VM is made of; see [`crate::builder`] and [`crate::persist`].
pub(crate) struct VmmParts {
    pub(crate) platform: Platform,
    pub(crate) mem: GuestMemoryMmap,
    /// The memfd behind guest memory; `None` when memory is a private mapping of a snapshot.
    pub(crate) memfd: Option<File>,
    /// The page-fault handler serving guest memory, when a `Uffd` backend restored it.
    pub(crate) page_fault_handler: Option<PageFaultHandler>,
    /// Which guest pages are free, for snapshots (the balloon fills it).
    pub(crate) pages: Arc<FreePages>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) devices: MmioDeviceManager,
    pub(crate) config: VmConfig,
    pub(crate) track_dirty: bool,
    /// `Some` to start paused, holding the guest clock to set on resume.
    pub(crate) paused_clock: Option<kvm_clock_data>,
    /// The first resume advances the guest clock by the wall-clock time since the snapshot.
    pub(crate) clock_realtime: bool,
}

/// A VM ready to run (and, once running, the owner of everything the vCPU threads use).
pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) memfd: Option<File>,
    /// Held, never used: its connection and userfaultfd must live as long as guest memory.
    _page_fault_handler: Option<PageFaultHandler>,
    pub(crate) pages: Arc<FreePages>,
    vcpus: Vec<Vcpu>,
    pub(crate) handles: Vec<VcpuHandle>,
    io: Arc<IoBuses>,
    signal: Arc<ExitSignal>,
    events: EventManager<Subscriber>,
    pub(crate) devices: MmioDeviceManager,
    pub(crate) serial: Arc<Mutex<kiln_devices::legacy::SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    pub(crate) config: VmConfig,
    pub(crate) track_dirty: bool,
    /// False after a snapshot failed once it had read (and so cleared) the dirty page log.
    pub(crate) dirty_log_intact: bool,
    /// The guest clock saved at pause time; `Some` exactly while paused.
    pub(crate) paused_clock: Option<kvm_clock_data>,
    /// The next resume sets the clock with `KVM_CLOCK_REALTIME` (a load with `clock_realtime`).
    clock_realtime: bool,
    api: Option<ApiLink>,
    resume_on_start: bool,
    seccomp: SeccompFilters,
    instance: crate::instance::Instance,
    /// Fires every [`crate::metrics::FLUSH_PERIOD`] once a metrics file is configured.
    metrics_timer: Option<vmm_sys_util::timerfd::TimerFd>,
}

impl TryFrom<&VmConfig> for Vmm {
    type Error = BuildError;

    fn try_from(config: &VmConfig) -> Result<Self, BuildError> {
        build(config, &crate::instance::Instance::default())
    }
}

/// Wakes the event loop when the exit signal fires.
pub(crate) struct ExitWatcher {
    signal: Arc<ExitSignal>,
}

impl ExitWatcher {
    /// Watches `signal`.
    pub(crate) fn new(signal: Arc<ExitSignal>) -> Self {
        Self { signal }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter; the reason itself is read from the signal by the loop.
        let _ = self.signal.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.signal.eventfd(), EventSet::IN)) {
            self.signal.request(ExitReason::Vmm(format!(
                "cannot watch the exit signal: {e:?}"
            )));
        }
    }
}

/// Wakes the event loop when an API request is waiting; the loop answers it.
struct ApiWatcher(vmm_sys_util::eventfd::EventFd);

impl MutEventSubscriber for ApiWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the API: {e:?}");
        }
    }
}

/// Wakes the event loop for a descriptor the loop itself reads afterwards (the metrics timer).
struct WakeOnly(std::os::fd::RawFd);

impl MutEventSubscriber for WakeOnly {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(self.0, 0, EventSet::IN)) {
            log::error!("cannot watch the metrics timer: {e:?}");
        }
    }
}

impl Vmm {
    /// Assembles a VMM from built parts.
    pub(crate) fn new(parts: VmmParts) -> Self {
        let Platform {
            vm,
            events,
            signal,
            io,
            serial,
            i8042,
        } = parts.platform;
        Self {
            vm,
            mem: parts.mem,
            memfd: parts.memfd,
            _page_fault_handler: parts.page_fault_handler,
            pages: parts.pages,
            vcpus: parts.vcpus,
            handles: Vec::new(),
            io: Arc::new(io),
            signal,
            events,
            devices: parts.devices,
            serial,
            i8042,
            config: parts.config,
            track_dirty: parts.track_dirty,
            dirty_log_intact: true,
            paused_clock: parts.paused_clock,
            clock_realtime: parts.clock_realtime,
            api: None,
            resume_on_start: false,
            seccomp: SeccompFilters::disabled(),
            instance: crate::instance::Instance::default(),
            metrics_timer: None,
        }
    }

    /// Hands the VMM the process-level state (id, log and metrics files, MMDS) it serves; with a
    /// metrics file, sets up the periodic flush (made here, before the VMM thread's filter).
    pub fn set_instance(&mut self, instance: crate::instance::Instance) {
        if instance.metrics.path().is_some() {
            match vmm_sys_util::timerfd::TimerFd::new().and_then(|mut t| {
                let period = crate::metrics::FLUSH_PERIOD;
                t.reset(period, Some(period)).map(|()| t)
            }) {
                Ok(timer) => {
                    // The loop wakes for the timer; `flush_metrics_if_due` reads it.
                    event_manager::SubscriberOps::add_subscriber(
                        &mut self.events,
                        Arc::new(Mutex::new(WakeOnly(timer.as_raw_fd()))),
                    );
                    self.metrics_timer = Some(timer);
                }
                Err(e) => log::error!("metrics: cannot make the flush timer: {e}"),
            }
        }
        self.instance = instance;
    }

    /// The process-level state.
    pub fn instance(&self) -> &crate::instance::Instance {
        &self.instance
    }

    /// The metrics groups of the devices: `block` and `net` (all drives, all interfaces
    /// together), `block_<id>` and `net_<id>` (each), `vsock` and `balloon`.
    pub fn metrics_line(&self) -> kiln_devices::metrics::Map<String, kiln_devices::metrics::Value> {
        use kiln_devices::metrics::{Map, add_counts};
        let mut groups = Map::new();
        let (mut all_block, mut all_net) = (Map::new(), Map::new());
        for dev in self.devices.devices() {
            match &dev.kind {
                crate::device_manager::VirtioKind::Block(b) => {
                    let b = b.lock().unwrap_or_else(|p| p.into_inner());
                    let report = b.metrics().report();
                    add_counts(&mut all_block, &report);
                    groups.insert(format!("block_{}", b.config().id), report.into());
                }
                crate::device_manager::VirtioKind::Net(n) => {
                    let n = n.lock().unwrap_or_else(|p| p.into_inner());
                    let report = n.metrics().report();
                    add_counts(&mut all_net, &report);
                    groups.insert(format!("net_{}", n.id()), report.into());
                }
                crate::device_manager::VirtioKind::Vsock(v) => {
                    let v = v.lock().unwrap_or_else(|p| p.into_inner());
                    groups.insert("vsock".into(), v.metrics().report().into());
                }
                crate::device_manager::VirtioKind::Balloon(b) => {
                    let b = b.lock().unwrap_or_else(|p| p.into_inner());
                    groups.insert("balloon".into(), b.metrics().report().into());
                }
            }
        }
        groups.insert("block".into(), all_block.into());
        groups.insert("net".into(), all_net.into());
        groups
    }

    /// Writes the metrics line now (`FlushMetrics`, the periodic timer, the VMM's exit).
    pub fn flush_metrics(&self) -> Result<(), crate::metrics::MetricsError> {
        self.instance.metrics.write(self.metrics_line())
    }

    /// Changes a drive of the running VM (`PATCH /drives`): its rate limits. A new backing file
    /// is refused (not supported yet).
    pub fn patch_drive(
        &mut self,
        update: &kiln_api::requests::drives::DriveUpdate,
    ) -> Result<(), String> {
        if update.path_on_host.is_some() {
            return Err("changing path_on_host of a running VM is not supported yet".into());
        }
        let block = self
            .devices
            .devices()
            .iter()
            .find_map(|d| match &d.kind {
                crate::device_manager::VirtioKind::Block(b)
                    if b.lock().unwrap_or_else(|p| p.into_inner()).config().id
                        == update.drive_id =>
                {
                    Some(b.clone())
                }
                _ => None,
            })
            .ok_or_else(|| "no such drive".to_string())?;
        if let Some(r) = &update.rate_limiter {
            let [bw, ops] = crate::config::rate_limiter::updates(Some(r));
            block
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update_rate_limiter(bw, ops);
            if let Some(d) = self
                .config
                .drives
                .iter_mut()
                .find(|d| d.drive_id == update.drive_id)
            {
                let mut limits = d.rate_limiter.unwrap_or_default();
                if r.bandwidth.is_some() {
                    limits.bandwidth = r.bandwidth;
                }
                if r.ops.is_some() {
                    limits.ops = r.ops;
                }
                d.rate_limiter = Some(limits);
            }
        }
        Ok(())
    }

    /// Serves `link` from the event loop once the VM runs.
    pub fn serve_api(&mut self, link: ApiLink) {
        match link.wakeup.try_clone() {
            Ok(wakeup) => {
                event_manager::SubscriberOps::add_subscriber(
                    &mut self.events,
                    Arc::new(Mutex::new(ApiWatcher(wakeup))),
                );
            }
            Err(e) => log::error!("cannot watch the API: {e}"),
        };
        self.api = Some(link);
    }

    /// Installs `filters` when [`Vmm::run`] starts: the VMM one on the calling thread, the vCPU
    /// one on each vCPU thread. Without this call, none is installed.
    pub fn set_seccomp(&mut self, filters: SeccompFilters) {
        self.seccomp = filters;
    }

    /// Lets the API's last answers (say, the 204 of an action that ended the VM) reach their
    /// clients before the process exits; waits at most `timeout`.
    pub fn flush_api(&self, timeout: std::time::Duration) {
        if let Some(api) = &self.api
            && !api.unwritten.wait_written(timeout)
        {
            log::warn!("exiting with API answers not yet written to their clients");
        }
    }

    /// The configuration the VM was built from (for GET /vm/config).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Runs a VM restored paused as soon as [`Vmm::run`] starts it (`resume_vm`).
    pub fn resume_on_start(&mut self) {
        self.resume_on_start = true;
    }

    /// True while the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused_clock.is_some()
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard. A paused guest reads the keys when it resumes.
    pub fn send_ctrl_alt_del(&self) -> Result<(), I8042Error> {
        self.i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trigger_ctrl_alt_del()
    }

    /// Changes a running network interface's rate limiters (`PATCH /network-interfaces/{id}`);
    /// the configuration `GET /vm/config` reports follows.
    pub fn update_net(&mut self, u: &NetworkInterfaceUpdate) -> Result<(), String> {
        use crate::config::rate_limiter::{api_rate_limiter, rate_limiter, updates};
        let net = self
            .devices
            .net(&u.iface_id)
            .ok_or("no such network interface")?
            .clone();
        for (what, l) in [
            ("rx_rate_limiter", &u.rx_rate_limiter),
            ("tx_rate_limiter", &u.tx_rate_limiter),
        ] {
            rate_limiter(l.as_ref())
                .check(what)
                .map_err(|e| e.to_string())?;
        }
        let mut net = net.lock().unwrap_or_else(|p| p.into_inner());
        net.update_rate_limiters(
            updates(u.rx_rate_limiter.as_ref()),
            updates(u.tx_rate_limiter.as_ref()),
        );
        let now = net.config();
        if let Some(c) = self
            .config
            .network_interfaces
            .iter_mut()
            .find(|c| c.iface_id == u.iface_id)
        {
            c.rx_rate_limiter = api_rate_limiter(&now.rx_rate_limiter);
            c.tx_rate_limiter = api_rate_limiter(&now.tx_rate_limiter);
        }
        log::info!("network interface {}: rate limiters updated", u.iface_id);
        Ok(())
    }

    /// Runs the guest until it resets, powers off, or fails; returns why it stopped. vCPU threads
    /// may still be inside KVM when this returns: the caller exits the process, with `self` alive.
    pub fn run(&mut self) -> ExitReason {
        log::debug!("run: starting");
        let msrs = match saveable_msrs(self.vm.kvm()) {
            Ok(list) => Arc::new(list),
            Err(e) => return ExitReason::Vmm(format!("cannot list KVM's saveable MSRs: {e}")),
        };
        if self.resume_on_start
            && let Some(clock) = self.paused_clock.take()
            && let Err(e) = self.set_clock(&clock)
        {
            return ExitReason::Vmm(format!("cannot set the restored guest clock: {e}"));
        }
        let start_paused = self.is_paused();
        // Every vCPU starts paused, so none runs the guest before this thread's filter is in.
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start(
                self.io.clone(),
                self.signal.clone(),
                msrs.clone(),
                &self.seccomp,
            ) {
                Ok(handle) => self.handles.push(handle),
                Err(e) => return ExitReason::Vmm(format!("cannot start a vCPU thread: {e}")),
            }
        }
        log::debug!("run: vCPU threads started");
        if let Err(e) = self.seccomp.install(ThreadKind::Vmm) {
            return ExitReason::Vmm(e.to_string());
        }
        if !start_paused {
            for handle in &self.handles {
                if let Err(e) = handle.resume() {
                    // A vCPU that could not install its filter has said why.
                    return self
                        .signal
                        .reason()
                        .unwrap_or_else(|| ExitReason::Vmm(format!("cannot start: {e}")));
                }
            }
        }
        log::info!(
            "vCPUs started{}",
            if start_paused { " (paused)" } else { "" }
        );
        loop {
            if let Some(reason) = self.signal.reason() {
                if reason.is_clean() && !self.is_paused() {
                    self.drain_devices();
                }
                return reason;
            }
            if self.is_paused() {
                self.wait_while_paused();
            } else if let Err(e) = self.events.run() {
                return ExitReason::Vmm(format!("event loop failed: {e:?}"));
            }
            self.answer_api();
            self.flush_metrics_if_due();
        }
    }

    /// Writes the metrics line if the periodic timer fired (it is read without blocking).
    fn flush_metrics_if_due(&mut self) {
        let Some(timer) = self.metrics_timer.as_mut() else {
            return;
        };
        let mut pfd = libc::pollfd {
            fd: timer.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } == 1 {
            let _ = timer.wait();
            if let Err(e) = self.flush_metrics() {
                log::warn!("{e}");
            }
        }
    }

    /// Runs the device work already waiting, so what a guest sent just before it rebooted (vsock
    /// data on its tx queue, say) still reaches the host. Bounded: a few passes without waiting.
    fn drain_devices(&mut self) {
        for _ in 0..16 {
            match self.events.run_with_timeout(0) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Blocks until an API request or the exit signal arrives (the devices stay unserved).
    fn wait_while_paused(&mut self) {
        let mut fds = vec![libc::pollfd {
            fd: self.signal.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(api) = &self.api {
            fds.push(libc::pollfd {
                fd: api.wakeup.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(timer) = &self.metrics_timer {
            fds.push(libc::pollfd {
                fd: timer.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd for its whole length, and the descriptors are
        // owned by `self` for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                self.signal
                    .request(ExitReason::Vmm(format!("waiting while paused failed: {e}")));
            }
        }
        if let Some(api) = &self.api {
            let _ = api.wakeup.read();
        }
    }

    fn answer_api(&mut self) {
        let Some(api) = self.api.take() else {
            return;
        };
        while let Ok(pending) = api.requests.try_recv() {
            pending.respond(|request| crate::api::running::handle(self, request));
        }
        self.api = Some(api);
    }

    /// Sets the guest clock for a resume: held where it was, or (the first resume after a load
    /// with `clock_realtime`) advanced by the wall-clock time since the snapshot.
    fn set_clock(&mut self, clock: &kvm_clock_data) -> Result<(), crate::vstate::vm::VmError> {
        if std::mem::take(&mut self.clock_realtime) {
            return self.vm.set_clock_realtime(clock);
        }
        self.vm.set_clock(clock)
    }

    /// Stops every vCPU and, with them, device work; the guest clock is held where it was. A
    /// pause that fails part way (a vCPU that does not answer, a clock KVM will not give) is
    /// undone: the vCPUs already paused run again, so the VM is never left half paused with no
    /// clock saved.
    pub fn pause(&mut self) -> Result<(), String> {
        if self.is_paused() {
            return Ok(());
        }
        let mut paused = 0;
        let result = (|| -> Result<kvm_clock_data, String> {
            for handle in &self.handles {
                handle.pause().map_err(|e| e.to_string())?;
                paused += 1;
            }
            let clock = self.vm.clock().map_err(|e| e.to_string())?;
            for handle in &self.handles {
                handle.notify_kvmclock().map_err(|e| e.to_string())?;
            }
            Ok(clock)
        })();
        match result {
            Ok(clock) => {
                self.paused_clock = Some(clock);
                log::info!("VM paused");
                Ok(())
            }
            Err(e) => {
                // The one that failed too: its pause may still be queued, and a resume behind
                // it in its channel undoes it whenever it gets there.
                let undo = (paused + 1).min(self.handles.len());
                for handle in &self.handles[..undo] {
                    if let Err(r) = handle.resume() {
                        log::warn!("undoing a failed pause: {r}");
                    }
                }
                Err(format!("pausing the VM failed ({e}); it runs on"))
            }
        }
    }

    /// Runs the vCPUs again, with the guest clock continuing from where it was paused.
    pub fn resume(&mut self) -> Result<(), String> {
        let Some(clock) = self.paused_clock else {
            return Ok(());
        };
        self.set_clock(&clock).map_err(|e| e.to_string())?;
        for handle in &self.handles {
            handle.resume().map_err(|e| e.to_string())?;
        }
        self.paused_clock = None;
        log::info!("VM resumed");
        Ok(())
    }
}
