//! The PS/2 keyboard behind the i8042: it answers the commands Linux's `atkbd` driver sends while
//! probing and configuring it, and knows the scan codes of the one chord the VMM presses.
//!
//! It speaks scan code set 2 only (what every PS/2 keyboard starts in and what Linux uses); the
//! controller translates to set 1 when the guest asks it to.

/// "Command understood", sent before any other answer.
pub(super) const ACK: u8 = 0xfa;
/// "Send that again": the answer to a byte the keyboard does not understand.
pub(super) const RESEND: u8 = 0xfe;
/// Basic assurance test passed, sent after a reset.
pub(super) const BAT_OK: u8 = 0xaa;
/// What an MF2 keyboard answers to "identify" (after the ACK).
pub(super) const ID: [u8; 2] = [0xab, 0x83];
/// Prefix of a key release in set 2.
pub(super) const RELEASE_PREFIX: u8 = 0xf0;

/// Ctrl-Alt-Del in scan code set 2: left Ctrl, left Alt and Delete (an extended key) pressed, then
/// released in reverse order. Linux's keyboard handler acts on Delete going down with Ctrl and Alt
/// held; the releases leave its modifier state clean.
pub(super) const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // press Ctrl, Alt, Delete
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // release Delete, Alt, Ctrl
];

/// Keyboard commands (a byte written to port 0x60 while no controller command waits for data).
const CMD_SET_LEDS: u8 = 0xed;
const CMD_ECHO: u8 = 0xee;
const CMD_SCAN_SET: u8 = 0xf0;
const CMD_GET_ID: u8 = 0xf2;
const CMD_SET_TYPEMATIC: u8 = 0xf3;
const CMD_ENABLE: u8 = 0xf4;
const CMD_DISABLE: u8 = 0xf5;
const CMD_SET_DEFAULT: u8 = 0xf6;
/// 0xF7..=0xFD set key types, which only matter in set 3; acknowledged and ignored.
const CMD_SET3_KEY_TYPES: std::ops::RangeInclusive<u8> = 0xf7..=0xfd;
const CMD_RESEND: u8 = 0xfe;
const CMD_RESET: u8 = 0xff;
/// The lowest command byte: anything below is a parameter, never a command.
const FIRST_COMMAND: u8 = CMD_SET_LEDS;

/// The only scan code set this keyboard speaks.
const SCAN_SET_2: u8 = 2;

/// A keyboard's state: whether it scans keys, and a command waiting for its parameter byte.
#[derive(Debug)]
pub(super) struct Keyboard {
    scanning: bool,
    awaiting: Option<u8>,
    /// The last answer sent, so a resend request can repeat its last byte.
    last: &'static [u8],
}

impl Keyboard {
    /// A keyboard as it is after power-on: scanning, in set 2.
    pub(super) fn new() -> Self {
        Self {
            scanning: true,
            awaiting: None,
            last: &[],
        }
    }

    /// True unless the guest turned scanning off (0xF5) and not back on.
    pub(super) fn is_scanning(&self) -> bool {
        self.scanning
    }

    /// Takes one byte from the host and returns the keyboard's answer.
    pub(super) fn receive(&mut self, byte: u8) -> &'static [u8] {
        // A command byte where a parameter was expected starts the new command, as on hardware.
        let answer: &'static [u8] = match self.awaiting.take() {
            Some(CMD_SCAN_SET) if byte == 0 => &[ACK, SCAN_SET_2],
            // LED states, typematic rates and "switch to set N" are accepted; the keyboard has
            // no LEDs and no keys of its own, and keeps speaking set 2 (Linux checks with F0 00).
            Some(_) if byte < FIRST_COMMAND => &[ACK],
            _ => match byte {
                CMD_SET_LEDS | CMD_SCAN_SET | CMD_SET_TYPEMATIC => {
                    self.awaiting = Some(byte);
                    &[ACK]
                }
                CMD_ECHO => &[CMD_ECHO],
                CMD_GET_ID => &[ACK, ID[0], ID[1]],
                CMD_ENABLE => {
                    self.scanning = true;
                    &[ACK]
                }
                CMD_DISABLE => {
                    self.scanning = false;
                    &[ACK]
                }
                CMD_SET_DEFAULT => &[ACK],
                b if CMD_SET3_KEY_TYPES.contains(&b) => &[ACK],
                // Repeats the last byte sent, and is not itself what a later resend repeats.
                CMD_RESEND => {
                    return self
                        .last
                        .split_last()
                        .map_or(&[], |(b, _)| std::slice::from_ref(b));
                }
                CMD_RESET => {
                    self.scanning = true;
                    &[ACK, BAT_OK]
                }
                _ => &[RESEND],
            },
        };
        self.last = answer;
        answer
    }
}

/// `code` as the controller passes it on with translation on (scan code set 1), for the codes
/// this keyboard sends: the keys of [`CTRL_ALT_DEL`] and the F7 byte of [`ID`]. Prefixes and
/// answers (0xE0, 0xFA, 0xAA, 0xAB, ...) are the same in both sets. A set-2 release (0xF0 then
/// the code) becomes the code with bit 7 set, which the controller handles.
pub(super) fn to_set1(code: u8) -> u8 {
    match code {
        0x14 => 0x1d, // left Ctrl
        0x11 => 0x38, // left Alt
        0x71 => 0x53, // Delete (after 0xE0)
        0x83 => 0x41, // F7, the second byte of the keyboard's id
        other => other,
    }
}
