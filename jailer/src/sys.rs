//! Small helpers shared by the modules that call libc: turning paths into C strings and `-1`
//! returns into `io::Error`s. Each caller keeps its own `unsafe` block and says why it holds.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `path` as a C string; a path holding a NUL byte cannot name a file.
pub fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", path.display()),
        )
    })
}

/// The error a libc call reported through `errno` when it returned -1.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`check`], for the `long` that `libc::syscall` returns.
pub fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// This process's id.
pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_bytes_are_refused_and_errno_is_read() {
        assert!(cstring(Path::new("/a\0b")).is_err());
        assert_eq!(cstring(Path::new("/ok")).unwrap().as_bytes(), b"/ok");
        assert_eq!(check(3).unwrap(), 3);
        // SAFETY: close on an fd number that is certainly not open only sets errno.
        let ret = unsafe { libc::close(-1) };
        assert_eq!(check(ret).unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}
