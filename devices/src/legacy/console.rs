//! The host side of COM1: reads the VMM's stdin into the UART's receive FIFO. The 16550's FIFO
//! holds 64 bytes; what does not fit waits here (at most one read's worth), and stdin is not read
//! again until the guest has drained the FIFO, so a fast writer never makes the VMM buffer more.

use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::serial::SerialDevice;

const INPUT: u32 = 0;
const DRAINED: u32 = 1;
/// Bytes read from stdin at a time (and so the most that ever waits here).
const READ_SIZE: usize = 4096;

/// Feeds `input` (normally stdin) to the guest's serial console.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: File,
    drained: EventFd,
    pending: Vec<u8>,
    watching_input: bool,
}

impl ConsoleInput {
    /// Feeds `input` to `serial`; `drained` is the eventfd the UART signals when its FIFO empties.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: File, drained: EventFd) -> Self {
        Self {
            serial,
            input,
            drained,
            pending: Vec::new(),
            watching_input: false,
        }
    }

    /// Moves waiting bytes into the FIFO as far as they fit.
    fn feed(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn set_watching(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.watching_input {
            return;
        }
        let events = Events::with_data(&self.input, INPUT, EventSet::IN);
        let result = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watching_input = watch,
            Err(e) => {
                log::debug!("serial console: stdin cannot be watched ({e:?}); no console input")
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.drained, DRAINED, EventSet::IN)) {
            log::warn!("serial console: cannot watch the UART: {e:?}");
            return;
        }
        self.set_watching(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => {
                let mut buf = [0u8; READ_SIZE];
                match self.input.read(&mut buf) {
                    Ok(0) => self.set_watching(ops, false), // end of input
                    Ok(n) => {
                        self.pending.extend_from_slice(&buf[..n]);
                        self.feed();
                        if !self.pending.is_empty() {
                            self.set_watching(ops, false);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::warn!(
                            "serial console: reading stdin failed ({e}); no more console input"
                        );
                        self.set_watching(ops, false);
                    }
                }
            }
            DRAINED => {
                let _ = self.drained.read();
                self.feed();
                if self.pending.is_empty() {
                    self.set_watching(ops, true);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::Write;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array with new descriptors or fails.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors are new and owned by nothing else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    fn read_all(serial: &Arc<Mutex<SerialDevice>>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = serial.lock().unwrap();
        loop {
            let mut lsr = [0u8; 1];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return out;
            }
            let mut b = [0u8; 1];
            s.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn stdin_reaches_the_guest_in_fifo_sized_steps() {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = evt();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            evt(),
            Box::new(std::io::sink()),
            drained.try_clone().unwrap(),
        )));
        let (rx, mut tx) = pipe();
        let console = Arc::new(Mutex::new(ConsoleInput::new(serial.clone(), rx, drained)));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(console.clone());

        let message: Vec<u8> = (0..200u8).collect();
        tx.write_all(&message).unwrap();
        em.run_with_timeout(100).unwrap();
        let mut got = read_all(&serial);
        assert_eq!(got.len(), 64, "one FIFO's worth; the rest waits");
        assert!(
            !console.lock().unwrap().watching_input,
            "stdin is not read while bytes wait"
        );
        while got.len() < message.len() {
            em.run_with_timeout(100).unwrap();
            got.extend(read_all(&serial));
        }
        assert_eq!(got, message, "every byte, in order");
        drop(tx);
        em.run_with_timeout(100).unwrap();
        em.run_with_timeout(100).unwrap();
        assert!(
            !console.lock().unwrap().watching_input,
            "end of input stops the watch"
        );
    }
}
