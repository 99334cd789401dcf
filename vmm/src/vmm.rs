//! A built VM and its event loop: start the vCPU threads, then wait on `event-manager` until
//! something asks the VM to stop.

use std::fs::File;
use std::sync::Arc;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};

use crate::builder::{BuildError, build};
use crate::config::VmConfig;
use crate::device_manager::Subscriber;
use crate::memory::GuestMemoryMmap;
use crate::vstate::exit::{ExitReason, ExitSignal, IoBuses};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// A VM ready to run (and, once running, the owner of everything the vCPU threads use).
pub struct Vmm {
    _vm: Vm,
    _mem: GuestMemoryMmap,
    _memfd: File,
    vcpus: Vec<Vcpu>,
    io: Arc<IoBuses>,
    signal: Arc<ExitSignal>,
    events: EventManager<Subscriber>,
}

impl TryFrom<&VmConfig> for Vmm {
    type Error = BuildError;

    fn try_from(config: &VmConfig) -> Result<Self, BuildError> {
        build(config)
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

impl Vmm {
    /// Assembles a VMM from built parts (see [`crate::builder`]).
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        memfd: File,
        vcpus: Vec<Vcpu>,
        io: Arc<IoBuses>,
        signal: Arc<ExitSignal>,
        events: EventManager<Subscriber>,
    ) -> Self {
        Self {
            _vm: vm,
            _mem: mem,
            _memfd: memfd,
            vcpus,
            io,
            signal,
            events,
        }
    }

    /// Adds an event-loop subscriber (the API, once the VM is built).
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        event_manager::SubscriberOps::add_subscriber(&mut self.events, subscriber);
    }

    /// Runs the guest until it resets, powers off, or fails; returns why it stopped. vCPU threads
    /// may still be inside KVM when this returns: the caller exits the process, with `self` alive.
    pub fn run(&mut self) -> ExitReason {
        for vcpu in self.vcpus.drain(..) {
            if let Err(e) = vcpu.start(self.io.clone(), self.signal.clone()) {
                return ExitReason::Vmm(format!("cannot start a vCPU thread: {e}"));
            }
        }
        log::info!("vCPUs started");
        loop {
            if let Some(reason) = self.signal.reason() {
                return reason;
            }
            if let Err(e) = self.events.run() {
                return ExitReason::Vmm(format!("event loop failed: {e:?}"));
            }
        }
    }
}
