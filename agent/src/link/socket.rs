//! A connected stream socket of any family (Unix, vsock), read and written with plain
//! `read(2)`/`write(2)`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A connected stream socket.
#[derive(Debug)]
pub struct Socket(File);

impl Socket {
    /// Wraps a connected socket.
    pub fn from_fd(fd: OwnedFd) -> Socket {
        Socket(File::from(fd))
    }

    /// Another handle to the same socket, for a second thread.
    pub fn try_clone(&self) -> io::Result<Socket> {
        self.0.try_clone().map(Socket)
    }

    /// Shuts both directions down, waking any thread blocked on the socket.
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on a descriptor we own; errors (already shut) are irrelevant.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sets (or clears, with `None`) the receive timeout.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero timeval means "no timeout" to the kernel, so a zero duration becomes 1 µs.
        let tv = match timeout {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_usec: d.subsec_micros().max(u32::from(d.is_zero())) as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: `tv` is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl From<Socket> for OwnedFd {
    fn from(s: Socket) -> OwnedFd {
        s.0.into()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
