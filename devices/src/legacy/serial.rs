//! COM1: a 16550A UART from `vm-superio`, its output written to stdout or a file, its interrupt
//! delivered through an eventfd registered with KVM as an irqfd.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises an interrupt by writing to an eventfd that KVM turns into a guest IRQ.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`, which the caller registers as an irqfd.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// Signals an eventfd when the guest has read everything in the receive FIFO, so the console can
/// hand it more input.
#[derive(Debug)]
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial console: cannot signal that input was read: {e}");
        }
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, InputDrained, SerialOut>,
    /// Set once an output error has been logged, so a closed stdout does not flood the log.
    output_error_logged: bool,
}

impl SerialDevice {
    /// A UART that raises `irq`, writes what the guest sends to `out`, and signals `drained`
    /// whenever the guest has read all queued input.
    pub fn new(irq: EventFd, out: SerialOut, drained: EventFd) -> Self {
        Self {
            uart: Serial::with_events(EventFdTrigger::new(irq), InputDrained(drained), out),
            output_error_logged: false,
        }
    }

    /// Queues bytes for the guest to read (console input); returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

/// The UART's registers and unread input, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR and SCR, in that order.
    pub registers: [u8; 9],
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// What restoring the UART needs besides its state (see [`SerialDevice::new`]).
pub struct SerialRestoreArgs {
    /// The interrupt eventfd.
    pub irq: EventFd,
    /// Where output goes.
    pub out: SerialOut,
    /// Signalled when the guest drained its input.
    pub drained: EventFd,
}

impl kiln_snapshot::Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = SerialRestoreArgs;
    type Error = String;

    fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    fn restore(args: SerialRestoreArgs, state: &SerialDeviceState) -> Result<Self, String> {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = state.registers;
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &saved,
            EventFdTrigger::new(args.irq),
            InputDrained(args.drained),
            args.out,
        )
        .map_err(|e| format!("serial port: cannot restore the UART: {e:?}"))?;
        Ok(Self {
            uart,
            output_error_logged: false,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // UART registers are a byte wide; a wider read sees the register in its low byte.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value)
            && !self.output_error_logged
        {
            log::warn!("serial console: guest output is being dropped: {e:?}");
            self.output_error_logged = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose reader has gone away.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn transmitted_bytes_reach_the_output_and_raise_thre() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()), evt());
        uart.write(THR, b"h");
        assert!(
            irq.read().is_err(),
            "no interrupt while THRE is not enabled"
        );
        uart.write(IER, &[0x02]); // enable the THR-empty interrupt
        for b in b"i\n" {
            uart.write(THR, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1, "THRE raised the IRQ");
        let mut lsr = [0u8; 1];
        uart.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "transmitter is empty and idle");
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialDevice::new(irq, Box::new(Sink::default()), evt());
        assert_eq!(uart.enqueue_input(b"ok"), 2);
        let (mut a, mut b, mut lsr) = ([0u8; 1], [0u8; 1], [0u8; 1]);
        uart.read(THR, &mut a);
        uart.read(THR, &mut b);
        uart.read(LSR, &mut lsr);
        assert_eq!(&[a[0], b[0]], b"ok");
        assert_eq!(lsr[0] & 1, 0, "no data left");
    }

    #[test]
    fn input_beyond_the_fifo_is_refused_and_draining_is_signalled() {
        let drained = evt();
        let mut uart = SerialDevice::new(
            evt(),
            Box::new(Sink::default()),
            drained.try_clone().unwrap(),
        );
        assert_eq!(
            uart.enqueue_input(&[b'x'; 100]),
            64,
            "the 16550A FIFO holds 64 bytes"
        );
        assert_eq!(uart.enqueue_input(b"more"), 0);
        let mut b = [0u8; 1];
        for _ in 0..64 {
            uart.read(THR, &mut b);
        }
        assert_eq!(drained.read().unwrap(), 1, "the guest emptied the FIFO");
    }

    #[test]
    fn state_round_trips_with_unread_input_and_an_oversized_fifo_is_refused() {
        use kiln_snapshot::Persist;
        let mut uart = SerialDevice::new(evt(), Box::new(Sink::default()), evt());
        uart.write(IER, &[0x01]);
        uart.write(7, &[0x5a]); // scratch
        assert_eq!(uart.enqueue_input(b"left"), 4);
        let state = uart.save();
        assert_eq!(state.in_buffer, b"left");
        let args = || SerialRestoreArgs {
            irq: evt(),
            out: Box::new(Sink::default()),
            drained: evt(),
        };
        let mut restored = SerialDevice::restore(args(), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut b = [0u8; 1];
        restored.read(THR, &mut b);
        assert_eq!(b[0], b'l', "unread input survives");
        let mut big = state;
        big.in_buffer = vec![0; 65];
        let e = SerialDevice::restore(args(), &big).err().unwrap();
        assert!(e.contains("cannot restore the UART"), "{e}");
    }

    #[test]
    fn hostile_accesses_and_a_dead_output_do_not_panic() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialDevice::new(irq, Box::new(Broken), evt());
        uart.write(THR, b"x");
        uart.write(THR, b"y");
        uart.write(THR, &[]);
        uart.write(1 << 40, b"z");
        let mut wide = [0xffu8; 4];
        uart.read(LSR, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        uart.read(1 << 40, &mut wide);
        uart.read(LSR, &mut []);
    }
}
