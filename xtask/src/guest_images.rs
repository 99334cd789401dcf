//! Guest-side test images: the busybox initramfs every lab test and benchmark boots. Its `/init`
//! prints a marker first thing (boot benchmarks time it), writes 123 to the boot timer through
//! /dev/mem when `KILN_BOOT_TIMER` is set on the kernel command line, reports CPU count and memory, runs
//! `$KILN_RUN` (set on the kernel command line) if given, and reboots, which ends kiln-vmm with 0.

use std::path::PathBuf;

use crate::initramfs;
use crate::util::{self, Result};

/// The test guest's `/init`.
const TEST_INIT: &str = r#"#!/bin/sh
# Kiln's L2 test guest (xtask/src/guest_images.rs).
echo KILN-INIT-START
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Firecracker's boot-time signal: 123 to the boot timer (kiln-vmm --boot-timer logs the time).
if [ -n "$KILN_BOOT_TIMER" ]; then devmem 0xd0000000 8 123; fi
cpus=$(grep -c '^processor' /proc/cpuinfo)
mem_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
echo "KILN-REPORT cpus=$cpus mem_kb=$mem_kb kernel=$(uname -r)"
if [ -n "$KILN_RUN" ]; then
  sh -c "$KILN_RUN"
  echo "KILN-RUN-EXIT $?"
fi
reboot -f
"#;

/// Builds (or finds in the cache) the test initramfs and returns its path.
pub fn test_initramfs() -> Result<PathBuf> {
    initramfs::cached(TEST_INIT, &[], &util::cache_dir().join("guest-images"))
}
