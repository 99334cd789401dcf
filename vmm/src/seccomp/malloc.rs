//! glibc's allocator, made to use only the system calls every thread's filter allows, whatever
//! the threads do and however they contend.
//!
//! Left alone, glibc 2.36's malloc has first-use and trimming paths that open files, which no
//! filter may allow:
//!
//! - A thread's first allocation picks an arena (`arena_get2`). While there are at most 8
//!   arenas (`arena_test`) it makes a new one per thread (a heap of its own: `mmap` and
//!   `mprotect`); past that it sets the arena limit from the number of CPUs, which it reads from
//!   `/sys/devices/system/cpu/online` (`openat`). Seven API connection threads at once were enough.
//! - Freeing in such a thread arena may shrink its heap (`heap_trim`, `shrink_heap`), which
//!   first asks whether overcommit is strict (`check_may_shrink_heap` reads
//!   `/proc/sys/vm/overcommit_memory`). A large answer freed on the API thread was enough.
//! - Which path a free takes depends on history: after a large mapped block is freed, the
//!   dynamic mmap threshold rises, and later blocks of that size come from the heap instead.
//!
//! So, first thing in `main` and before any thread exists (the arena limit is read once, when
//! the first arena beyond the main one is wanted, and arenas made before would stay in use):
//!
//! - `M_ARENA_MAX` = 1: every thread allocates from the main arena, whose heap is the `brk`
//!   area. `arena_get2` then never makes an arena and never counts CPUs: it attaches the thread
//!   to the main arena under its lock (`futex`). The main arena trims with `brk` (`systrim`)
//!   and never asks about overcommit. The price is one lock for all threads, which the VMM's
//!   few threads, allocating little on their hot paths, do not feel.
//! - `M_MMAP_THRESHOLD` = 128 KiB, fixed (setting it turns the dynamic threshold off): a block
//!   that large is always its own mapping (`mmap` without `PROT_EXEC`), freed with `munmap`
//!   and grown or shrunk by `realloc` with `mremap(MREMAP_MAYMOVE)`; smaller blocks always come
//!   from the heap.
//!
//! What malloc, free and realloc can then call is `brk`, `mmap` (read-write, for large blocks,
//! or for the heap if `brk` fails), `munmap`, `mremap` with `MREMAP_MAYMOVE` and `futex`; the
//! per-thread caches (tcache) add nothing. A thread ending adds `madvise(MADV_DONTNEED)` on its
//! stack. Every filter allows each of these (`seccomp/tests.rs` checks the JSON, and
//! `tests/alloc_under_seccomp.rs` runs each thread kind's worst allocation patterns under the
//! real filters). Other C libraries (musl) have no arenas and no `mallopt`: nothing to do there.

/// The allocator refused a setting.
#[derive(Debug, thiserror::Error)]
#[error("the C library's malloc refused mallopt({option}, {value})")]
pub struct MallocError {
    /// The option's name.
    pub option: &'static str,
    /// The value asked for.
    pub value: i32,
}

/// The mmap threshold: glibc's default starting value, made fixed.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Makes the allocator's system calls the ones the filters allow (see the module's doc). Call
/// it first thing in `main`, before any thread is started.
pub fn configure() -> Result<(), MallocError> {
    #[cfg(target_env = "gnu")]
    {
        set("M_ARENA_MAX", libc::M_ARENA_MAX, 1)?;
        set("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD)?;
    }
    Ok(())
}

#[cfg(target_env = "gnu")]
fn set(option: &'static str, param: libc::c_int, value: i32) -> Result<(), MallocError> {
    // SAFETY: mallopt takes two integers and changes only malloc's own settings.
    match unsafe { libc::mallopt(param, value) } {
        1 => Ok(()),
        _ => Err(MallocError { option, value }),
    }
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn glibc_takes_the_settings() {
        // Harmless to repeat in the test process: it only sets the same values.
        configure().unwrap();
    }

    #[test]
    fn a_refused_setting_is_named() {
        // glibc takes nearly anything, but not a fastbin limit above 160 bytes (so the
        // process is left as it was).
        let e = set("M_MXFAST", libc::M_MXFAST, 10_000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the C library's malloc refused mallopt(M_MXFAST, 10000)"
        );
    }
}
