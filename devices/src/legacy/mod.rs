//! Legacy PC devices on port I/O: the 16550 UART on COM1 and the i8042 keyboard controller, which
//! turns the guest's reset request into a clean VMM exit and carries the VMM's Ctrl-Alt-Del.

pub mod console;
pub mod console_log;
pub mod i8042;
pub mod serial;

pub use console::ConsoleInput;
pub use console_log::{CONSOLE_LOG_CAP, ConsoleLog};
pub use i8042::{I8042, I8042Error};
pub use serial::{EventFdTrigger, SerialDevice, SerialDeviceState, SerialRestoreArgs};

/// COM1's port base and the width of a 16550's register file.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports a 16550 occupies.
pub const COM1_LEN: u64 = 8;
/// COM1's interrupt line on the PIC / IOAPIC.
pub const COM1_IRQ: u32 = 4;
/// The i8042's data port; its command/status port is 4 above.
pub const I8042_PORT: u64 = 0x60;
/// Ports the i8042 covers (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// The keyboard's interrupt line on the PIC / IOAPIC.
pub const I8042_KBD_IRQ: u32 = 1;
