//! The i8042 keyboard controller with a PS/2 keyboard behind it: enough for Linux's `i8042` and
//! `atkbd` drivers to find the keyboard, so the VMM can press Ctrl-Alt-Del
//! ([`I8042::trigger_ctrl_alt_del`]); and the CPU reset line, which Linux's `reboot=k` pulses
//! (command 0xFE on port 0x64) and Kiln turns into a clean exit of the VMM.
//!
//! What the guest sees:
//! - Port 0x64 reads the status register and takes controller commands; port 0x60 reads the output
//!   buffer and takes bytes for the keyboard, or the parameter of the last controller command.
//! - IRQ 1 rises (through an eventfd the VMM registers as an irqfd) whenever a byte reaches the
//!   head of the output buffer while the command byte enables keyboard interrupts, so the guest
//!   reads one byte per interrupt.
//! - There is no AUX (mouse) port. AUX commands are unknown here, as on an AT-type 8042, and the
//!   keyboard refuses the byte that follows them, so Linux rules the port out after two commands
//!   instead of waiting for timeouts (its `i8042_check_aux`).
//! - The command byte starts with translation off, so Linux drives the keyboard in scan code set 2
//!   (`atkbd` "raw" mode). A guest that turns translation on gets set 1 codes instead.
//!
//! A guest may write anything to these ports: the output buffer is bounded and every byte has a
//! defined effect, so nothing here can panic or grow.

mod keyboard;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use keyboard::Keyboard;

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
/// Status bit: the keyboard is not inhibited by a keylock (Linux warns when this is clear).
const STATUS_NOT_INHIBITED: u8 = 0x10;

const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_INTERFACE_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// The next data byte appears in the output buffer as if the keyboard had sent it.
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;

/// Command-byte bit: raise IRQ 1 when the keyboard's output is full.
const CONTROL_KBD_INT: u8 = 0x01;
/// Command-byte bit: the system flag (POST passed).
const CONTROL_SYSTEM: u8 = 0x04;
/// Command-byte bit: keyboard clock disabled.
const CONTROL_KBD_DISABLED: u8 = 0x10;
/// Command-byte bit: translate the keyboard's set 2 codes to set 1.
const CONTROL_TRANSLATE: u8 = 0x40;
/// The command byte at power-on: keyboard interrupts on, so a guest restored from a snapshot
/// (whose driver set the byte long ago) still gets its keys; translation off, see the top.
const CONTROL_DEFAULT: u8 = CONTROL_KBD_INT | CONTROL_SYSTEM;

/// Output-port bit 0: the CPU reset line, active low.
const OUTPUT_PORT_RESET_INACTIVE: u8 = 0x01;
/// Output-port bit 1: the A20 gate, always on in a VM.
const OUTPUT_PORT_A20: u8 = 0x02;

/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Keyboard interface test passed.
const INTERFACE_TEST_OK: u8 = 0x00;

/// Bytes the output buffer holds; more are dropped, so a guest cannot grow it. Linux's driver
/// reads at most this many bytes when it flushes the controller before declaring it broken.
const OUTPUT_CAPACITY: usize = 16;

/// Why a key press could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not read earlier bytes, so the keys do not fit the output buffer.
    #[error(
        "the i8042 output buffer has room for {free} bytes and Ctrl-Alt-Del needs {needed}: the guest is not reading its keyboard"
    )]
    BufferFull {
        /// Bytes the key sequence takes.
        needed: usize,
        /// Bytes free in the output buffer.
        free: usize,
    },
    /// The guest switched the keyboard off, so a real keyboard would not send keys either.
    #[error(
        "the guest has disabled its keyboard (i8042 command byte {control:#04x}, keyboard scanning {scanning})"
    )]
    KeyboardDisabled {
        /// The controller's command byte.
        control: u8,
        /// Whether the keyboard itself scans keys.
        scanning: bool,
    },
}

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataTarget {
    Keyboard,
    ControlByte,
    OutputPort,
    KeyboardOutput,
}

/// The controller and its keyboard.
pub struct I8042 {
    on_reset: Box<dyn FnMut() + Send>,
    irq: EventFd,
    control: u8,
    last_was_command: bool,
    target: DataTarget,
    output: VecDeque<u8>,
    keyboard: Keyboard,
    /// With translation on, a set-2 release prefix was swallowed and marks the next code.
    release_pending: bool,
    /// Set once a failed IRQ write has been logged, so a broken eventfd does not flood the log.
    irq_error_logged: bool,
}

impl I8042 {
    /// A controller that raises IRQ 1 by writing `irq` (registered by the caller as an irqfd) and
    /// calls `on_reset` whenever the guest pulls the CPU reset line.
    pub fn new(irq: EventFd, on_reset: Box<dyn FnMut() + Send>) -> Self {
        Self {
            on_reset,
            irq,
            control: CONTROL_DEFAULT,
            last_was_command: false,
            target: DataTarget::Keyboard,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            keyboard: Keyboard::new(),
            release_pending: false,
            irq_error_logged: false,
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard: queues the scan codes and raises IRQ 1.
    /// Nothing is queued when they do not all fit.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let scanning = self.keyboard.is_scanning();
        if !scanning || self.control & CONTROL_KBD_DISABLED != 0 {
            return Err(I8042Error::KeyboardDisabled {
                control: self.control,
                scanning,
            });
        }
        let needed = keyboard::CTRL_ALT_DEL.len();
        let free = OUTPUT_CAPACITY - self.output.len();
        if free < needed {
            return Err(I8042Error::BufferFull { needed, free });
        }
        self.pass_keyboard_bytes(&keyboard::CTRL_ALT_DEL);
        Ok(())
    }

    fn interrupt(&mut self) {
        if self.control & CONTROL_KBD_INT == 0 {
            return;
        }
        if let Err(e) = self.irq.write(1)
            && !self.irq_error_logged
        {
            self.irq_error_logged = true;
            log::error!("i8042: cannot raise IRQ 1: {e}");
        }
    }

    /// Queues a byte for the guest; false when the buffer is full and the byte was dropped.
    fn push(&mut self, byte: u8) -> bool {
        if self.output.len() >= OUTPUT_CAPACITY {
            return false;
        }
        self.output.push_back(byte);
        // A byte behind others raises its interrupt when the guest reads the one before it.
        if self.output.len() == 1 {
            self.interrupt();
        }
        true
    }

    /// Queues the controller's own answer to a command.
    fn reply(&mut self, byte: u8) {
        if !self.push(byte) {
            log::debug!("i8042: output buffer full, dropping reply {byte:#04x}");
        }
    }

    /// Queues bytes the keyboard sent, translated to set 1 when the command byte asks for it.
    fn pass_keyboard_bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            let byte = if self.control & CONTROL_TRANSLATE == 0 {
                byte
            } else if byte == keyboard::RELEASE_PREFIX {
                self.release_pending = true;
                continue;
            } else if std::mem::take(&mut self.release_pending) {
                keyboard::to_set1(byte) | 0x80
            } else {
                keyboard::to_set1(byte)
            };
            if !self.push(byte) {
                log::debug!("i8042: output buffer full, dropping keyboard byte {byte:#04x}");
            }
        }
    }

    fn set_control(&mut self, byte: u8) {
        let interrupts_enabled = byte & !self.control & CONTROL_KBD_INT != 0;
        self.control = byte;
        if interrupts_enabled && !self.output.is_empty() {
            self.interrupt();
        }
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        // A new command abandons a parameter the previous one was waiting for.
        self.target = DataTarget::Keyboard;
        match cmd {
            CMD_READ_CONTROL => self.reply(self.control),
            CMD_WRITE_CONTROL => self.target = DataTarget::ControlByte,
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_KBD_INTERFACE_TEST => self.reply(INTERFACE_TEST_OK),
            CMD_KBD_DISABLE => self.control |= CONTROL_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CONTROL_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.reply(OUTPUT_PORT_RESET_INACTIVE | OUTPUT_PORT_A20),
            CMD_WRITE_OUTPUT_PORT => self.target = DataTarget::OutputPort,
            CMD_WRITE_KBD_OUTPUT => self.target = DataTarget::KeyboardOutput,
            // 0xF0..=0xFF pulse output-port lines low for the bits that are clear; bit 0 is reset.
            0xf0..=0xff if cmd & 1 == 0 => (self.on_reset)(),
            0xf0..=0xff => {}
            // AUX commands (0xA7..=0xA9, 0xD3, 0xD4) included: there is no AUX port.
            _ => log::debug!("i8042: ignoring command {cmd:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.target, DataTarget::Keyboard) {
            DataTarget::ControlByte => self.set_control(byte),
            DataTarget::OutputPort if byte & OUTPUT_PORT_RESET_INACTIVE == 0 => (self.on_reset)(),
            DataTarget::OutputPort => {}
            DataTarget::KeyboardOutput => self.pass_keyboard_bytes(&[byte]),
            DataTarget::Keyboard => {
                let answer = self.keyboard.receive(byte);
                self.pass_keyboard_bytes(answer);
            }
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM | STATUS_NOT_INHIBITED;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        if !self.output.is_empty() {
            self.interrupt();
        }
        byte
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
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
