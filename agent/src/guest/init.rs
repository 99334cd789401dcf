//! What the agent does as the guest's PID 1: optionally put a tmpfs overlay over a read-only root,
//! mount the kernel filesystems, name the host, bring up loopback and (with `kiln.net=` on the
//! kernel command line) eth0, make the root writable, and at
//! the end stop everything and reset the VM (Kiln's VMM treats a reset as a clean exit; there is no
//! ACPI to power off with).

use std::ffi::CString;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::time::{Duration, Instant};

use super::log;

/// The hostname when the kernel command line has no `kiln.hostname=`.
pub const DEFAULT_HOSTNAME: &str = "kiln";

/// (source, target, type, flags, data, mode of the target directory)
const MOUNTS: &[(&str, &str, &str, libc::c_ulong, &str, u32)] = &[
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, "", 0o555),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, "", 0o555),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        "mode=0755",
        0o755,
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
        0o755,
    ),
    (
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        NOSUID_NODEV,
        "mode=1777",
        0o1777,
    ),
    ("tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, "mode=1777", 0o1777),
    ("tmpfs", "/run", "tmpfs", NOSUID_NODEV, "mode=0755", 0o755),
];

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
const NOSUID_NODEV_NOEXEC: libc::c_ulong = NOSUID_NODEV | libc::MS_NOEXEC;

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let (source, target, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all four are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The environment variable (from `KILN_OVERLAY=tmpfs` on the kernel command line) asking PID 1 to
/// run on a tmpfs overlay over the read-only root: writes stay in guest memory and vanish with the
/// VM, the image is never changed, and many VMs can share one image.
pub const OVERLAY_ENV: &str = "KILN_OVERLAY";

/// Where the overlay's tmpfs is mounted before the switch (`/run` exists in every rootfs).
const OVERLAY_BASE: &str = "/run";

/// Mounts a tmpfs overlay on the read-only root and makes it the root (pivot_root), so everything
/// PID 1 mounts next lands in the writable tree.
fn overlay_root() -> io::Result<()> {
    let step =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    mount(
        "kiln-overlay",
        OVERLAY_BASE,
        "tmpfs",
        NOSUID_NODEV,
        "mode=0755",
    )
    .map_err(step("tmpfs"))?;
    for dir in ["upper", "work", "root"] {
        std::fs::create_dir(format!("{OVERLAY_BASE}/{dir}")).map_err(step("overlay folders"))?;
    }
    let options = format!("lowerdir=/,upperdir={OVERLAY_BASE}/upper,workdir={OVERLAY_BASE}/work");
    let root = format!("{OVERLAY_BASE}/root");
    mount("overlay", &root, "overlay", 0, &options).map_err(step("overlay"))?;
    std::fs::create_dir_all(format!("{root}/.kiln-old-root")).map_err(step("old-root folder"))?;
    std::env::set_current_dir(&root).map_err(step("chdir"))?;
    // SAFETY: both paths are valid NUL-terminated strings; "." is the new root, a mount point.
    if unsafe {
        libc::syscall(
            libc::SYS_pivot_root,
            c".".as_ptr(),
            c".kiln-old-root".as_ptr(),
        )
    } < 0
    {
        return Err(step("pivot_root")(io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    // The old root stays referenced by the overlay as its lower layer; only its name goes.
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c"/.kiln-old-root".as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(step("detaching the old root")(io::Error::last_os_error()));
    }
    let _ = std::fs::remove_dir("/.kiln-old-root");
    Ok(())
}

/// Sets up the guest as PID 1. Failures are logged and skipped: a guest without, say, /dev/shm
/// is still worth running commands in.
pub fn setup() {
    if std::env::var(OVERLAY_ENV).as_deref() == Ok("tmpfs")
        && let Err(e) = overlay_root()
    {
        log(format_args!("root stays as it is, without an overlay: {e}"));
    }
    for &(source, target, fstype, flags, data, mode) in MOUNTS {
        let _ = std::fs::DirBuilder::new().mode(mode).create(target);
        match mount(source, target, fstype, flags, data) {
            Ok(()) => {}
            // The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => log(format_args!("mounting {fstype} on {target}: {e}")),
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    // The kernel mounts the root read-only unless told `rw`; writable is what commands expect.
    // A read-only drive refuses, and then the root stays read-only.
    if root_is_read_only()
        && let Err(e) = mount("", "/", "", libc::MS_REMOUNT, "")
    {
        log(format_args!("root stays read-only: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let hostname = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.hostname="))
        .unwrap_or(DEFAULT_HOSTNAME);
    // SAFETY: sethostname reads `len` bytes from the valid string.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } < 0 {
        log(format_args!(
            "setting hostname {hostname}: {}",
            io::Error::last_os_error()
        ));
    }
    if let Err(e) = loopback_up() {
        log(format_args!("bringing up lo: {e}"));
    }
    match crate::protocol::NetSpec::from_cmdline(&cmdline).map(|r| r.and_then(|s| s.validate())) {
        None => {}
        Some(Ok(net)) => {
            if let Err(e) = super::net::configure(&net) {
                log(format_args!("network: {e}"));
            }
        }
        Some(Err(e)) => log(format_args!("network: {e}")),
    }
}

fn root_is_read_only() -> bool {
    // SAFETY: statvfs is plain data; all-zero is valid before the call fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a static NUL-terminated path and a valid out-pointer.
    let rc = unsafe { libc::statvfs(c"/".as_ptr(), &mut st) };
    rc == 0 && st.f_flag & libc::ST_RDONLY != 0
}

/// Sets IFF_UP on `lo`, so programs that talk to localhost work.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned here alone.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the ioctls read and write the valid ifreq passed.
    unsafe {
        if libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits until no process but us is left, up to `limit`.
fn wait_for_others(limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        // SAFETY: kill with signal 0 only checks whether any process could be signalled.
        if unsafe { libc::kill(-1, 0) } < 0 {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops every process, syncs, unmounts and resets the machine. Only for PID 1.
pub fn power_off() -> ! {
    // SAFETY: kill(-1) signals every process but PID 1 itself; it has no memory effects.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    if !wait_for_others(Duration::from_secs(2)) {
        // SAFETY: as above.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        wait_for_others(Duration::from_secs(1));
    }
    // SAFETY: sync(2) has no arguments.
    unsafe { libc::sync() };
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| *t != "/")
        .map(|t| t.replace("\\040", " "))
        .collect();
    for target in targets.iter().rev() {
        if let Ok(t) = CString::new(target.as_str()) {
            // SAFETY: umount2 with a valid path; failure leaves the mount, which reset discards.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if let Err(e) = mount("", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, "") {
        log(format_args!("remounting / read-only: {e}"));
    }
    // SAFETY: as above.
    unsafe { libc::sync() };
    loop {
        // SAFETY: reboot(2) with a valid command; on success it does not return.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        log(format_args!("reboot: {}", io::Error::last_os_error()));
        std::thread::sleep(Duration::from_secs(1));
    }
}
