//! The guest's memory, set up by PID 1 at boot before any command runs: zram swap, swappiness
//! and page-cluster, transparent huge pages off, and the size of the blocks free page reporting
//! hands back to the host.
//!
//! The host decides through the kernel command line (`kiln run --zram` writes it):
//! - `kiln.zram=off|SIZE`: SIZE is bytes with an optional K, M or G suffix, or `N%` of the
//!   guest's memory; the default is [`DEFAULT_ZRAM_PERCENT`] %. zram is a compressed swap device
//!   in guest memory (lz4): pages the guest swaps out take a fraction of their size, so a guest
//!   can hold a working set larger than its memory when it compresses, and memory a busy guest
//!   would otherwise pin stays small enough for the host to get back.
//! - `kiln.swappiness=N` (0 to 200, default 100): with swap in RAM, swapping anonymous pages is as
//!   cheap as dropping page cache, so the kernel should weigh them alike.
//! - page-cluster is 0: swap-in reads one page, not eight; zram has no seek to amortise.
//! - Transparent huge pages are turned off where the kernel has them: a 2 MiB page is not free as
//!   a whole while any 4 KiB of it is used, which starves free page reporting.
//! - Free page reporting hands back blocks of 2^[`PAGE_REPORTING_ORDER`] pages (2 MiB) instead of
//!   the kernel's default pageblock (4 MiB on Kiln's kernel, which has no hugetlbfs): more of the
//!   memory freed by a fragmented guest goes back, at one more report entry per 2 MiB.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// The zram size when the command line names none: half of the guest's memory (exec-sandbox and
/// ChromeOS use 40-50 %). Only what is swapped uses memory, compressed.
pub const DEFAULT_ZRAM_PERCENT: u32 = 50;
/// The swappiness when the command line names none.
pub const DEFAULT_SWAPPINESS: u32 = 100;
/// The free page reporting order the agent sets (2 MiB blocks of 4 KiB pages).
pub const PAGE_REPORTING_ORDER: u32 = 9;
/// The zram device.
pub const ZRAM_DEV: &str = "/dev/zram0";
const ZRAM_SYS: &str = "/sys/block/zram0";
/// The page size swap headers count in (x86_64).
const PAGE: u64 = 4096;
/// Swap needs at least this many pages (the header and nine more), as mkswap refuses less.
const MIN_SWAP_PAGES: u64 = 10;

/// How big the zram swap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZramSize {
    /// No zram.
    Off,
    /// This many bytes.
    Bytes(u64),
    /// This percentage of MemTotal.
    Percent(u32),
}

impl ZramSize {
    /// Parses `off`, `N`, `NK`, `NM`, `NG` or `N%` (what `kiln run --zram` takes too).
    pub fn parse(text: &str) -> Result<ZramSize, String> {
        let bad = || format!("zram size {text:?} is not off, a size (N, NK, NM or NG) or N%");
        if text == "off" {
            return Ok(ZramSize::Off);
        }
        if let Some(p) = text.strip_suffix('%') {
            return match p.parse::<u32>() {
                Ok(p) if (1..=400).contains(&p) => Ok(ZramSize::Percent(p)),
                _ => Err(format!(
                    "zram size {text:?}: a percentage is from 1% to 400%"
                )),
            };
        }
        let (digits, shift) = match text.char_indices().last() {
            Some((i, 'K' | 'k')) => (&text[..i], 10),
            Some((i, 'M' | 'm')) => (&text[..i], 20),
            Some((i, 'G' | 'g')) => (&text[..i], 30),
            _ => (text, 0),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
        if bytes < MIN_SWAP_PAGES * PAGE {
            return Err(format!(
                "zram size {text:?} is below the smallest swap, {} KiB",
                MIN_SWAP_PAGES * PAGE / 1024
            ));
        }
        Ok(ZramSize::Bytes(bytes))
    }

    /// Bytes of zram for a guest with `mem_total` bytes of memory (whole pages); `None` for off.
    pub fn bytes(self, mem_total: u64) -> Option<u64> {
        let bytes = match self {
            ZramSize::Off => return None,
            ZramSize::Bytes(b) => b,
            ZramSize::Percent(p) => mem_total.saturating_mul(u64::from(p)) / 100,
        };
        Some((bytes / PAGE * PAGE).max(MIN_SWAP_PAGES * PAGE))
    }
}

/// What the command line asks of the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySettings {
    /// The zram swap.
    pub zram: ZramSize,
    /// vm.swappiness.
    pub swappiness: u32,
}

impl MemorySettings {
    /// The settings in a kernel command line; a malformed value is an error naming it (the host
    /// checks what it writes, so this is a hand-written command line's mistake).
    pub fn from_cmdline(cmdline: &str) -> Result<MemorySettings, String> {
        let mut s = MemorySettings {
            zram: ZramSize::Percent(DEFAULT_ZRAM_PERCENT),
            swappiness: DEFAULT_SWAPPINESS,
        };
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("kiln.zram=") {
                s.zram = ZramSize::parse(v).map_err(|e| format!("kiln.zram: {e}"))?;
            } else if let Some(v) = word.strip_prefix("kiln.swappiness=") {
                s.swappiness = v
                    .parse()
                    .ok()
                    .filter(|n| *n <= 200)
                    .ok_or_else(|| format!("kiln.swappiness={v} is not from 0 to 200"))?;
            }
        }
        Ok(s)
    }
}

/// MemTotal from `/proc/meminfo`, in bytes.
fn mem_total() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other("/proc/meminfo has no MemTotal"))
}

/// Writes `value` to the sysfs or procfs file `path`, naming it in the error.
fn write_knob(path: &str, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("writing {value:?} to {path}: {e}")))
}

/// A version-1 swap header for a device of `bytes` (what mkswap writes): the last usable page
/// at 1024 + 4, and the signature at the end of the first page.
pub fn swap_header(bytes: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    let last_page = (bytes / PAGE - 1) as u32;
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    page[PAGE as usize - 10..].copy_from_slice(b"SWAPSPACE2");
    page
}

/// Sizes zram0 to `bytes`, compressing with lz4, and swaps to it.
fn zram_swap(bytes: u64) -> io::Result<()> {
    // lz4 is the kernel's default here (ZRAM_DEF_COMP_LZ4); naming it keeps another kernel honest.
    write_knob(&format!("{ZRAM_SYS}/comp_algorithm"), "lz4")?;
    write_knob(&format!("{ZRAM_SYS}/disksize"), &bytes.to_string())?;
    let dev = File::options()
        .write(true)
        .open(ZRAM_DEV)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {ZRAM_DEV}: {e}")))?;
    dev.write_all_at(&swap_header(bytes), 0)
        .and_then(|()| dev.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("writing the swap header: {e}")))?;
    drop(dev);
    // Highest priority (SWAP_FLAG_PREFER with priority 32767, from <sys/swap.h>, which the libc
    // crate does not carry): zram is the fastest swap, and the only one.
    const SWAP_FLAG_PREFER: libc::c_int = 0x8000;
    const SWAP_FLAG_PRIO_MASK: libc::c_int = 0x7fff;
    let flags = SWAP_FLAG_PREFER | (32767 & SWAP_FLAG_PRIO_MASK);
    // SAFETY: swapon with a NUL-terminated path and integer flags.
    if unsafe { libc::swapon(c"/dev/zram0".as_ptr(), flags) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("swapon {ZRAM_DEV}: {e}")));
    }
    Ok(())
}

/// Sets the guest's memory up as `settings` say; returns what failed (each is logged by the
/// caller; the guest runs commands either way).
pub fn setup(settings: &MemorySettings) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |r: io::Result<()>| {
        if let Err(e) = r {
            problems.push(e.to_string());
        }
    };
    // Where the kernel has no THP (Kiln's) the file does not exist, and THP is off already.
    if std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        note(write_knob(
            "/sys/kernel/mm/transparent_hugepage/enabled",
            "never",
        ));
    }
    // Present when the kernel has free page reporting; the balloon driver set its own order when it
    // registered, which this replaces.
    let order = "/sys/module/page_reporting/parameters/page_reporting_order";
    if std::path::Path::new(order).exists() {
        note(write_knob(order, &PAGE_REPORTING_ORDER.to_string()));
    }
    note(write_knob(
        "/proc/sys/vm/swappiness",
        &settings.swappiness.to_string(),
    ));
    note(write_knob("/proc/sys/vm/page-cluster", "0"));
    match mem_total().map(|total| settings.zram.bytes(total)) {
        Ok(Some(bytes)) => note(zram_swap(bytes)),
        Ok(None) => {}
        Err(e) => note(Err(e)),
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_mistakes_are_named() {
        assert_eq!(ZramSize::parse("off"), Ok(ZramSize::Off));
        assert_eq!(ZramSize::parse("128M"), Ok(ZramSize::Bytes(128 << 20)));
        assert_eq!(ZramSize::parse("2g"), Ok(ZramSize::Bytes(2 << 30)));
        assert_eq!(ZramSize::parse("65536K"), Ok(ZramSize::Bytes(64 << 20)));
        assert_eq!(ZramSize::parse("1048576"), Ok(ZramSize::Bytes(1 << 20)));
        assert_eq!(ZramSize::parse("40%"), Ok(ZramSize::Percent(40)));
        for bad in [
            "",
            "M",
            "12T",
            "-1M",
            "1.5G",
            "on",
            "0%",
            "500%",
            "99999999999G",
        ] {
            assert!(ZramSize::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            ZramSize::parse("4K").unwrap_err(),
            "zram size \"4K\" is below the smallest swap, 40 KiB"
        );
        assert_eq!(
            ZramSize::parse("lots").unwrap_err(),
            "zram size \"lots\" is not off, a size (N, NK, NM or NG) or N%"
        );
    }

    #[test]
    fn sizes_become_whole_pages_of_memory() {
        let total = 246 << 20;
        assert_eq!(ZramSize::Percent(50).bytes(total), Some(123 << 20));
        assert_eq!(ZramSize::Bytes(10_000_000).bytes(total), Some(9_998_336));
        assert_eq!(ZramSize::Off.bytes(total), None);
    }

    #[test]
    fn the_command_line_sets_zram_and_swappiness() {
        let s = MemorySettings::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(
            s,
            MemorySettings {
                zram: ZramSize::Percent(DEFAULT_ZRAM_PERCENT),
                swappiness: DEFAULT_SWAPPINESS
            }
        );
        let s = MemorySettings::from_cmdline("kiln.zram=off kiln.swappiness=60").unwrap();
        assert_eq!((s.zram, s.swappiness), (ZramSize::Off, 60));
        let s = MemorySettings::from_cmdline("kiln.zram=200M").unwrap();
        assert_eq!(s.zram, ZramSize::Bytes(200 << 20));
        assert_eq!(
            MemorySettings::from_cmdline("kiln.swappiness=300").unwrap_err(),
            "kiln.swappiness=300 is not from 0 to 200"
        );
        assert!(
            MemorySettings::from_cmdline("kiln.zram=big")
                .unwrap_err()
                .starts_with("kiln.zram: zram size \"big\"")
        );
    }

    #[test]
    fn the_swap_header_is_mkswaps() {
        let h = swap_header(64 << 20);
        assert_eq!(h.len(), 4096);
        assert_eq!(&h[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(h[1024..1028].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_le_bytes(h[1028..1032].try_into().unwrap()),
            (64 << 20) / 4096 - 1
        );
        // Compare with mkswap's own header where the host has it.
        let path = std::env::temp_dir().join(format!("kiln-swap-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 << 20]).unwrap();
        let made = std::process::Command::new("mkswap")
            .args(["-U", "clear"])
            .arg(&path)
            .output();
        if let Ok(out) = made
            && out.status.success()
        {
            let theirs = std::fs::read(&path).unwrap();
            assert_eq!(&theirs[1024..1032], &h[1024..1032], "version and last page");
            assert_eq!(&theirs[4086..4096], &h[4086..4096], "signature");
        }
        let _ = std::fs::remove_file(&path);
    }
}
