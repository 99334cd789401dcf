//! The thread that runs one vCPU, and the handle the VMM thread uses to pause, resume and save it.
//!
//! A paused vCPU sits outside KVM_RUN waiting for requests. To pause a running one the VMM sends
//! the request and then *kicks* the thread with a signal (a no-op handler, so KVM_RUN returns
//! EINTR); since the signal can land just before the thread enters KVM_RUN, the kick repeats until
//! the thread answers. Before answering, the thread re-enters KVM_RUN once with `immediate_exit`
//! set, which completes any port or MMIO read it had exited for, so the saved registers are
//! consistent (KVM's API documentation asks for exactly this before saving state).
//!
//! The thread installs the vCPU seccomp filter before anything else, so no guest code runs on an
//! unfiltered vCPU thread ([`crate::seccomp`]).

use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::exit::{ExitReason, ExitSignal, IoBuses, VcpuAction, handle_exit};
use super::vcpu::Vcpu;
use super::vcpu_state::{self, VcpuState};
use crate::seccomp::{SeccompFilters, ThreadKind};

/// How long a vCPU may take to answer a request before the VMM gives up on it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an unanswered pause request is re-kicked.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// What the VMM thread asks of a vCPU thread.
#[derive(Debug)]
enum Request {
    Pause,
    Resume,
    Save,
    Kvmclock,
}

/// A vCPU thread's answers.
enum Response {
    Paused,
    Resumed,
    Saved(Box<Result<VcpuState, String>>),
    KvmclockNotified,
}

/// A request or response with its number: an answer that comes after its asker gave up (a vCPU
/// held outside KVM_RUN past [`ANSWER_TIMEOUT`]) is recognised as stale and dropped, so the
/// channel never stays off by one.
struct Numbered<T> {
    seq: u64,
    item: T,
}

/// Sends `request` numbered `seq` and waits for the answer with the same number, discarding
/// older ones; `kick` is called before each wait of `wait` (every [`KICK_INTERVAL`] when
/// kicking). Gives up at [`ANSWER_TIMEOUT`].
fn ask_numbered<Q, A>(
    requests: &Sender<Numbered<Q>>,
    responses: &Receiver<Numbered<A>>,
    seq: u64,
    request: Q,
    mut kick: Option<&mut dyn FnMut()>,
    timeout: Duration,
) -> Result<A, AskError> {
    requests
        .send(Numbered { seq, item: request })
        .map_err(|_| AskError::Stopped)?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(kick) = kick.as_mut() {
            kick();
        }
        let wait = if kick.is_some() {
            KICK_INTERVAL
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match responses.recv_timeout(wait) {
            Ok(r) if r.seq == seq => return Ok(r.item),
            // A late answer to an earlier request: dropped.
            Ok(_) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(AskError::Stopped),
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                return Err(AskError::Timeout);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Why [`ask_numbered`] got no answer.
#[derive(Debug, PartialEq, Eq)]
enum AskError {
    Stopped,
    Timeout,
}

/// A vCPU did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    /// The thread has ended (the VM is stopping).
    #[error("vCPU {0} has stopped")]
    Stopped(u8),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {ANSWER_TIMEOUT:?}")]
    Timeout(u8),
    /// Saving failed.
    #[error("{0}")]
    Save(String),
}

/// The signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's no-op handler once per process.
fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// The VMM thread's end of a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    requests: Sender<Numbered<Request>>,
    responses: Receiver<Numbered<Response>>,
    next_seq: AtomicU64,
    thread: JoinHandle<()>,
}

/// What the thread running a vCPU owns.
struct VcpuThread {
    id: u8,
    fd: VcpuFd,
    requests: Receiver<Numbered<Request>>,
    responses: Sender<Numbered<Response>>,
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Starts the thread that runs this vCPU until the VM stops. The thread installs the vCPU
    /// filter of `seccomp`, then waits paused: the guest runs from [`VcpuHandle::resume`] on.
    /// `msr_indices` are the MSRs saved in snapshots.
    pub fn start(
        self,
        io: Arc<IoBuses>,
        signal: Arc<ExitSignal>,
        msr_indices: Arc<Vec<u32>>,
        seccomp: &SeccompFilters,
    ) -> std::io::Result<VcpuHandle> {
        install_kick_handler()?;
        let (id, fd) = self.into_parts();
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let mut thread = VcpuThread {
            id,
            fd,
            requests: req_rx,
            responses: resp_tx,
            msr_indices,
        };
        let seccomp = seccomp.clone();
        let handle = std::thread::Builder::new()
            .name(format!("kiln_vcpu{id}"))
            .spawn(move || {
                if let Err(e) = seccomp.install(ThreadKind::Vcpu) {
                    signal.request(ExitReason::Vmm(format!("vCPU {id}: {e}")));
                    return;
                }
                thread.run(&io, &signal)
            })?;
        Ok(VcpuHandle {
            id,
            requests: req_tx,
            responses: resp_rx,
            next_seq: AtomicU64::new(1),
            thread: handle,
        })
    }
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn ask(&self, request: Request, kick: bool) -> Result<Response, VcpuControlError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        // A failed kick means the thread is gone; the receive reports that.
        let mut kicker = || {
            let _ = self.thread.kill(kick_signal());
        };
        let kick: Option<&mut dyn FnMut()> = if kick { Some(&mut kicker) } else { None };
        ask_numbered(
            &self.requests,
            &self.responses,
            seq,
            request,
            kick,
            ANSWER_TIMEOUT,
        )
        .map_err(|e| match e {
            AskError::Stopped => VcpuControlError::Stopped(self.id),
            AskError::Timeout => VcpuControlError::Timeout(self.id),
        })
    }

    /// Stops the vCPU outside KVM_RUN, with any pending I/O completed.
    pub fn pause(&self) -> Result<(), VcpuControlError> {
        match self.ask(Request::Pause, true)? {
            Response::Paused => Ok(()),
            _ => Err(VcpuControlError::Stopped(self.id)),
        }
    }

    /// Tells KVM the guest was paused (KVM_KVMCLOCK_CTRL), so its watchdogs do not fire for the
    /// paused time. Only meaningful while paused.
    pub fn notify_kvmclock(&self) -> Result<(), VcpuControlError> {
        match self.ask(Request::Kvmclock, false)? {
            Response::KvmclockNotified => Ok(()),
            _ => Err(VcpuControlError::Stopped(self.id)),
        }
    }

    /// Runs the guest again.
    pub fn resume(&self) -> Result<(), VcpuControlError> {
        match self.ask(Request::Resume, false)? {
            Response::Resumed => Ok(()),
            _ => Err(VcpuControlError::Stopped(self.id)),
        }
    }

    /// Saves the (paused) vCPU's state.
    pub fn save(&self) -> Result<VcpuState, VcpuControlError> {
        match self.ask(Request::Save, false)? {
            Response::Saved(result) => (*result).map_err(VcpuControlError::Save),
            _ => Err(VcpuControlError::Stopped(self.id)),
        }
    }
}

impl VcpuThread {
    fn run(&mut self, io: &IoBuses, signal: &ExitSignal) {
        if !self.paused(signal) {
            return;
        }
        while !signal.is_stopping() {
            match self.requests.try_recv() {
                Ok(Numbered {
                    seq,
                    item: Request::Pause,
                }) => {
                    if !self.pause(io, signal, seq) {
                        return;
                    }
                    continue;
                }
                // Answered, so the asker is never left waiting: resuming a running vCPU is
                // already done; saving or telling kvmclock only makes sense paused.
                Ok(Numbered { seq, item }) => {
                    let item = match item {
                        Request::Resume => Response::Resumed,
                        Request::Kvmclock => Response::KvmclockNotified,
                        _ => Response::Saved(Box::new(Err(format!(
                            "vCPU {} is running; it must be paused first",
                            self.id
                        )))),
                    };
                    if self.responses.send(Numbered { seq, item }).is_err() {
                        return;
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
            if let Some(reason) = self.step(io) {
                signal.request(reason);
                return;
            }
        }
    }

    /// One KVM_RUN and its exit; Some when the VM must stop.
    fn step(&mut self, io: &IoBuses) -> Option<ExitReason> {
        let vcpu = self.id;
        let action = match self.fd.run() {
            Ok(exit) => handle_exit(exit, io, vcpu),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VcpuAction::Continue,
            Err(e) => {
                VcpuAction::Stop(ExitReason::Vmm(format!("vCPU {vcpu}: KVM_RUN failed: {e}")))
            }
        };
        match action {
            VcpuAction::Continue => None,
            VcpuAction::Stop(reason) => Some(self.describe(reason)),
        }
    }

    /// Completes the I/O the last exit was for, without running guest code: KVM_RUN with
    /// `immediate_exit` set finishes the pending emulation and returns EINTR.
    fn complete_pending_io(&mut self, io: &IoBuses) -> Option<ExitReason> {
        self.fd.set_kvm_immediate_exit(1);
        let mut stop = None;
        // A real exit instead of EINTR is handled like any other; at most a few can happen.
        for _ in 0..4 {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) => {
                    stop = Some(ExitReason::Vmm(format!(
                        "vCPU {}: KVM_RUN (completing I/O before a pause) failed: {e}",
                        self.id
                    )));
                    break;
                }
                Ok(exit) => {
                    if let VcpuAction::Stop(reason) = handle_exit(exit, io, self.id) {
                        stop = Some(self.describe(reason));
                        break;
                    }
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        stop
    }

    /// Pauses on request: completes pending I/O, answers, then serves requests until resumed.
    /// Returns false when the thread must end.
    fn pause(&mut self, io: &IoBuses, signal: &ExitSignal, seq: u64) -> bool {
        if let Some(reason) = self.complete_pending_io(io) {
            signal.request(reason);
            return false;
        }
        let answer = Numbered {
            seq,
            item: Response::Paused,
        };
        if self.responses.send(answer).is_err() {
            return false;
        }
        self.paused(signal)
    }

    /// Serves requests while paused; true once resumed.
    fn paused(&mut self, signal: &ExitSignal) -> bool {
        loop {
            let Ok(Numbered { seq, item: request }) = self.requests.recv() else {
                return false;
            };
            let response = match request {
                Request::Resume => {
                    let answer = Numbered {
                        seq,
                        item: Response::Resumed,
                    };
                    let ok = self.responses.send(answer).is_ok();
                    return ok && !signal.is_stopping();
                }
                Request::Pause => Response::Paused,
                Request::Save => Response::Saved(Box::new(
                    vcpu_state::save(&self.fd, self.id, &self.msr_indices)
                        .map_err(|e| e.to_string()),
                )),
                Request::Kvmclock => {
                    // EINVAL means the guest does not use kvmclock; nothing to tell then.
                    if let Err(e) = self.fd.kvmclock_ctrl()
                        && e.errno() != libc::EINVAL
                    {
                        log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {e}", self.id);
                    }
                    Response::KvmclockNotified
                }
            };
            if self
                .responses
                .send(Numbered {
                    seq,
                    item: response,
                })
                .is_err()
            {
                return false;
            }
        }
    }

    /// Adds the guest's RIP and KVM's sub-error to an internal error, which KVM reports bare,
    /// and the guest's registers to a triple fault (a guest that dies with nothing on its console
    /// leaves at least where it was and what its tables were).
    fn describe(&mut self, reason: ExitReason) -> ExitReason {
        if let ExitReason::TripleFault { vcpu, .. } = reason {
            let state = match (self.fd.get_regs(), self.fd.get_sregs()) {
                (Ok(r), Ok(s)) => format!(
                    "; guest RIP {:#x} RSP {:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} \
                     IDT {:#x}+{:#x} GDT {:#x}+{:#x} CS {:#x}",
                    r.rip,
                    r.rsp,
                    s.cr0,
                    s.cr2,
                    s.cr3,
                    s.cr4,
                    s.efer,
                    s.idt.base,
                    s.idt.limit,
                    s.gdt.base,
                    s.gdt.limit,
                    s.cs.selector
                ),
                _ => String::new(),
            };
            return ExitReason::TripleFault { vcpu, state };
        }
        let ExitReason::InternalError { vcpu, .. } = reason else {
            return reason;
        };
        let suberror = self.fd.get_kvm_run().exit_reason;
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the run union is valid.
        let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "unknown".into());
        let what = match sub {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            _ => "unknown",
        };
        ExitReason::InternalError {
            vcpu,
            detail: format!("{what} (exit {suberror}, suberror {sub}) at guest RIP {rip}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_late_answer_is_dropped_and_the_next_request_gets_its_own() {
        let (req_tx, req_rx) = channel::<Numbered<u32>>();
        let (resp_tx, resp_rx) = channel::<Numbered<u32>>();
        // A "vCPU" that answers its first request only after the asker gave up.
        let vcpu = std::thread::spawn(move || {
            let first = req_rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(150));
            resp_tx
                .send(Numbered {
                    seq: first.seq,
                    item: first.item * 10,
                })
                .unwrap();
            let second = req_rx.recv().unwrap();
            resp_tx
                .send(Numbered {
                    seq: second.seq,
                    item: second.item * 10,
                })
                .unwrap();
        });
        let short = Duration::from_millis(50);
        assert_eq!(
            ask_numbered(&req_tx, &resp_rx, 1, 1, None, short),
            Err(AskError::Timeout)
        );
        // The late answer to request 1 arrives first and is dropped.
        assert_eq!(
            ask_numbered(&req_tx, &resp_rx, 2, 2, None, Duration::from_secs(5)),
            Ok(20)
        );
        vcpu.join().unwrap();
        assert_eq!(
            ask_numbered(&req_tx, &resp_rx, 3, 3, None, short),
            Err(AskError::Stopped)
        );
    }

    #[test]
    fn kicks_repeat_until_the_answer() {
        let (req_tx, req_rx) = channel::<Numbered<u32>>();
        let (resp_tx, resp_rx) = channel::<Numbered<u32>>();
        let kicks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = kicks.clone();
        let vcpu = std::thread::spawn(move || {
            let r = req_rx.recv().unwrap();
            while seen.load(Ordering::SeqCst) < 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
            resp_tx
                .send(Numbered {
                    seq: r.seq,
                    item: 7,
                })
                .unwrap();
        });
        let mut kick = || {
            kicks.fetch_add(1, Ordering::SeqCst);
        };
        let got = ask_numbered(
            &req_tx,
            &resp_rx,
            9,
            0,
            Some(&mut kick),
            Duration::from_secs(5),
        );
        assert_eq!(got, Ok(7));
        vcpu.join().unwrap();
    }
}
