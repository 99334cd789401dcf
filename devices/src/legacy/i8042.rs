//! The i8042 keyboard controller, reduced to what a guest kernel uses in a VM: the controller
//! commands Linux sends while probing, and the reset line. Linux's `reboot=k` pulses the reset line
//! (command 0xFE on port 0x64); Kiln turns that into a clean exit of the VMM.

use std::collections::VecDeque;

use crate::bus::BusDevice;

/// Offset of the data port (0x60) within the device.
const DATA: u64 = 0;
/// Offset of the command/status port (0x64) within the device.
const COMMAND: u64 = 4;

/// Status bit: the output buffer holds a byte for the guest.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Status bit: the controller passed its self-test (the "system flag").
const STATUS_SYSTEM: u8 = 0x04;
/// Status bit: the last write was to the command port.
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_INTERFACE_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;

/// Control-byte bit: keyboard clock disabled.
const CONTROL_KBD_DISABLED: u8 = 0x10;
/// Output-port bit 0: the CPU reset line, active low.
const OUTPUT_PORT_RESET_INACTIVE: u8 = 0x01;
/// Output-port bit 1: the A20 gate, always on in a VM.
const OUTPUT_PORT_A20: u8 = 0x02;

/// Answer a keyboard gives to every command it understands.
const KBD_ACK: u8 = 0xfa;
/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;

/// Bytes the output queue holds before new ones are dropped (a guest cannot grow it without bound).
const OUTPUT_CAPACITY: usize = 16;

/// What the next byte on the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataTarget {
    Keyboard,
    ControlByte,
    OutputPort,
}

/// The controller.
pub struct I8042 {
    on_reset: Box<dyn FnMut() + Send>,
    control: u8,
    status: u8,
    target: DataTarget,
    output: VecDeque<u8>,
}

impl I8042 {
    /// A controller that calls `on_reset` whenever the guest pulls the CPU reset line.
    pub fn new(on_reset: Box<dyn FnMut() + Send>) -> Self {
        Self {
            on_reset,
            control: 0,
            status: STATUS_SYSTEM,
            target: DataTarget::Keyboard,
            output: VecDeque::new(),
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CONTROL => self.push_output(self.control),
            CMD_WRITE_CONTROL => self.target = DataTarget::ControlByte,
            CMD_SELF_TEST => {
                self.status |= STATUS_SYSTEM;
                self.push_output(SELF_TEST_OK);
            }
            CMD_KBD_INTERFACE_TEST => self.push_output(0),
            CMD_KBD_DISABLE => self.control |= CONTROL_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CONTROL_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push_output(OUTPUT_PORT_RESET_INACTIVE | OUTPUT_PORT_A20),
            CMD_WRITE_OUTPUT_PORT => self.target = DataTarget::OutputPort,
            // 0xF0..=0xFF pulse output-port lines low for the bits that are clear; bit 0 is reset.
            0xf0..=0xff if cmd & 1 == 0 => (self.on_reset)(),
            _ => log::debug!("i8042: ignoring command {cmd:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match std::mem::replace(&mut self.target, DataTarget::Keyboard) {
            DataTarget::ControlByte => self.control = byte,
            DataTarget::OutputPort if byte & OUTPUT_PORT_RESET_INACTIVE == 0 => (self.on_reset)(),
            DataTarget::OutputPort => {}
            DataTarget::Keyboard => self.push_output(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => self.output.pop_front().unwrap_or(0),
            COMMAND => {
                let full = if self.output.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                self.status | full
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn controller() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        (
            I8042::new(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })),
            resets,
        )
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_calls_back_once_per_pulse() {
        let (mut dev, resets) = controller();
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        dev.write(COMMAND, &[0xff]); // pulses no line
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[OUTPUT_PORT_A20]); // reset line driven low
        assert_eq!(resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn control_byte_and_self_test_round_trip() {
        let (mut dev, resets) = controller();
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_WRITE_CONTROL]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CONTROL]);
        assert_eq!(
            read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL,
            STATUS_OUTPUT_FULL
        );
        assert_eq!(read(&mut dev, DATA), 0x47);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        dev.write(COMMAND, &[CMD_READ_OUTPUT_PORT]);
        assert_eq!(read(&mut dev, DATA) & OUTPUT_PORT_RESET_INACTIVE, 1);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_flood_of_keyboard_bytes_stays_bounded() {
        let (mut dev, _) = controller();
        for _ in 0..10_000 {
            dev.write(DATA, &[0xed]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
        dev.write(7, &[1]);
        dev.write(DATA, &[]);
        assert_eq!(read(&mut dev, 2), 0xff);
    }
}
