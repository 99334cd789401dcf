//! The serial console written to a file, kept to a bounded size: a guest printing in a loop must
//! not fill the host's disk. When the file reaches its cap, its last quarter moves to the front
//! behind a line saying how much was cut, and writing goes on after it: the file always ends
//! with what the guest printed last (the part worth reading after a failure) and never grows
//! past the cap. Only `pread`/`pwrite`/`ftruncate` on the open file are used, so the vCPU thread
//! (which runs the UART) needs no new descriptors.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// The default cap on a console log file.
pub const CONSOLE_LOG_CAP: u64 = 8 << 20;

/// A console log file that keeps its tail within a cap.
pub struct ConsoleLog {
    file: File,
    len: u64,
    cap: u64,
    /// Bytes cut so far.
    dropped: u64,
}

impl ConsoleLog {
    /// Writes to `file` (fresh and empty, open for reading and writing), never letting it pass
    /// `cap` bytes (at least 4 KiB).
    pub fn new(file: File, cap: u64) -> Self {
        Self {
            file,
            len: 0,
            cap: cap.max(4096),
            dropped: 0,
        }
    }

    /// Bytes cut from the front so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Moves the last quarter of the file to its front, behind a note.
    fn cut(&mut self) -> io::Result<()> {
        let keep = self.cap / 4;
        let mut tail = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut tail, self.len - keep)?;
        self.dropped += self.len - keep;
        let note = format!(
            "\n[kiln-vmm: console log capped at {} bytes; {} earlier bytes dropped]\n",
            self.cap, self.dropped
        );
        self.file.write_all_at(note.as_bytes(), 0)?;
        self.file.write_all_at(&tail, note.len() as u64)?;
        self.len = note.len() as u64 + keep;
        self.file.set_len(self.len)
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.cap && self.len > self.cap / 4 {
            self.cut()?;
        }
        // What still does not fit (a write larger than the room left) is cut to its tail.
        let room = (self.cap - self.len) as usize;
        let take = &buf[buf.len().saturating_sub(room)..];
        self.dropped += (buf.len() - take.len()) as u64;
        self.file.write_all_at(take, self.len)?;
        self.len += take.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_printing_forever_leaves_a_bounded_file_ending_with_its_last_line() {
        let path = std::env::temp_dir().join(format!("kiln-console-cap-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut log = ConsoleLog::new(file, 64 * 1024);
        let mut printed = 0u64;
        for i in 0..20_000u32 {
            let line = format!("line {i}\n");
            printed += line.len() as u64;
            log.write_all(line.as_bytes()).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 64 * 1024);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("line 19999\n"),
            "{}",
            &text[text.len() - 40..]
        );
        assert!(text.contains("earlier bytes dropped]"));
        assert!(log.dropped() > 0 && log.dropped() < printed);
        // One write bigger than the whole cap keeps its own tail.
        log.write_all(&[b'x'; 200 * 1024]).unwrap();
        log.write_all(b"end\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 64 * 1024 && text.ends_with("xxxxend\n"));
        let _ = std::fs::remove_file(&path);
    }
}
