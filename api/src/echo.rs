//! Bounds on what an answer echoes back of its request.
//!
//! Fault messages name the value that was wrong (a path, a field, a file name), and that value
//! came from the client: a 30,000-character path or a 46,000-character `kernel_image_path` would
//! otherwise come back whole, so the answer would grow with the input. Every fault message
//! passes through [`bound_fault`] on its way into an [`crate::ApiResponse`], whichever thread or
//! crate wrote it, so no site can forget: each long run of non-blank characters (a path, a
//! quoted value) is cut to [`MAX_ECHO`] bytes with a note saying how long it was, and the
//! message as a whole to [`MAX_FAULT`] bytes. Short messages, which is nearly all of them, are
//! returned untouched without copying.

use std::borrow::Cow;
use std::fmt::Write;

/// Longest run of non-blank characters (a path, a value) kept whole in a fault message, in bytes.
pub const MAX_ECHO: usize = 256;

/// Longest fault message, in bytes, before the note saying it was cut.
pub const MAX_FAULT: usize = 2048;

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `value` cut to [`MAX_ECHO`] bytes with a note giving its full length, for log lines and
/// messages that name one value.
pub fn clip(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_ECHO {
        return Cow::Borrowed(value);
    }
    Cow::Owned(format!(
        "{}... ({} bytes, truncated)",
        prefix(value, MAX_ECHO),
        value.len()
    ))
}

/// `message` with every run of non-blank characters longer than [`MAX_ECHO`] bytes cut (see
/// [`clip`]) and the whole cut to [`MAX_FAULT`] bytes: its size no longer depends on the input.
pub fn bound_fault(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_ECHO {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len().min(MAX_FAULT + 64));
    for piece in message.split_inclusive(char::is_whitespace) {
        let run = piece.trim_end_matches(char::is_whitespace);
        out.push_str(&clip(run));
        out.push_str(&piece[run.len()..]);
        if out.len() > MAX_FAULT {
            let kept = prefix(&out, MAX_FAULT).len();
            out.truncate(kept);
            // Writing to a String cannot fail.
            let _ = write!(out, "... (message of {} bytes, truncated)", message.len());
            break;
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_messages_are_untouched() {
        let m = "boot-source: cannot open /x/vmlinux: No such file or directory";
        assert!(matches!(bound_fault(m), Cow::Borrowed(s) if s == m));
        let exactly = "a".repeat(MAX_ECHO);
        assert_eq!(clip(&exactly), exactly.as_str());
        assert_eq!(bound_fault(&exactly), exactly.as_str());
    }

    #[test]
    fn a_long_path_is_cut_with_a_note_and_the_rest_of_the_message_kept() {
        let path = format!("/{}", "p".repeat(30_000));
        let m = format!("unknown path {path}");
        let bounded = bound_fault(&m);
        assert!(bounded.starts_with(&format!("unknown path /{}", "p".repeat(255))));
        assert!(
            bounded.ends_with("... (30001 bytes, truncated)"),
            "{bounded}"
        );
        assert!(bounded.len() < MAX_ECHO + 64, "{} bytes", bounded.len());

        let m = format!("boot-source: cannot open {path}: File name too long (os error 36)");
        let bounded = bound_fault(&m);
        assert!(
            // The run is the path and its colon.
            bounded.ends_with("(30002 bytes, truncated) File name too long (os error 36)"),
            "{bounded}"
        );
    }

    #[test]
    fn many_short_runs_are_cut_as_a_whole() {
        let m = "word ".repeat(10_000);
        let bounded = bound_fault(&m);
        assert!(bounded.len() <= MAX_FAULT + 64, "{} bytes", bounded.len());
        assert!(
            bounded.ends_with("... (message of 50000 bytes, truncated)"),
            "{bounded}"
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        // Three-byte characters never line up with the limits.
        let run = "€".repeat(1000);
        let bounded = bound_fault(&run);
        assert!(bounded.starts_with(&"€".repeat(85)), "{bounded}");
        assert!(
            bounded.ends_with("... (3000 bytes, truncated)"),
            "{bounded}"
        );
        let spaced = "€ ".repeat(2000);
        assert!(bound_fault(&spaced).len() <= MAX_FAULT + 64);
        assert_eq!(prefix("€", 2), "");
        assert_eq!(prefix("a€", 3), "a");
    }

    #[test]
    fn other_whitespace_is_kept() {
        let m = format!("line one\n\t{} end", "x".repeat(400));
        let bounded = bound_fault(&m);
        assert!(bounded.starts_with("line one\n\txxx"), "{bounded}");
        assert!(bounded.ends_with("(400 bytes, truncated) end"), "{bounded}");
    }
}
