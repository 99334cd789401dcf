//! Every thread kind's worst allocation patterns under the real seccomp filters, each scenario in
//! a forked child that must exit 0: many threads allocating and freeing at once, blocks from 1 B
//! to 64 MiB, zeroed and over-aligned ones, reallocs growing across the mmap threshold and back,
//! blocks freed on another thread than the one that allocated them, and threads ending under
//! their filter. One more scenario reads the page map as a snapshot of a restored VM with a
//! balloon does, under the VMM thread's filter.
//!
//! This test has its own `main` (`harness = false` in Cargo.toml): libtest would start threads,
//! and so arenas, before any test ran, and glibc reads the arena limit only once. Here nothing
//! has allocated from a second thread when a child is forked, so each child starts as
//! `kiln-vmm` does and calls the same `malloc::configure` first. A control child skips it and
//! must be stopped by a filter, which shows the scenarios can fail.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use kiln_vmm::seccomp::{EXIT_BAD_SYSCALL, ThreadKind, install_program, malloc, program};
use seccompiler::BpfProgram;

/// Threads per scenario: more than glibc's 8 arenas before it counts CPUs.
const THREADS: usize = 16;
/// A child that has not finished by then is killed by SIGALRM (and the scenario fails).
const CHILD_SECONDS: u32 = 240;

/// How a forked child ended, and what it wrote on stderr.
#[derive(Debug)]
struct Outcome {
    exit: Option<i32>,
    signal: Option<i32>,
    stderr: String,
}

/// What a scenario must end with.
enum Expect {
    Clean,
    /// Stopped by a filter, which says so.
    Stopped,
}

/// Writes `n` bytes at `ptr` sparsely (a byte per 4 KiB page), so the pages are really there.
fn touch(ptr: *mut u8, n: usize) {
    let mut i = 0;
    while i < n {
        // SAFETY: `ptr` points to at least `n` writable bytes and `i < n`.
        unsafe { ptr.add(i).write_volatile(i as u8) };
        i += 4096;
    }
    if n > 0 {
        // SAFETY: as above, for the last byte.
        unsafe { ptr.add(n - 1).write_volatile(0xa5) };
    }
}

/// Blocks of every size from 1 B to 64 MiB (doubling, and odd sizes around each), allocated,
/// written, and freed; some kept a while so frees come in a different order than allocations.
fn sizes(seed: usize) {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut size = 1usize;
    while size <= 64 << 20 {
        for n in [size, size + 1 + seed % 7, size.saturating_sub(3).max(1)] {
            let mut v = Vec::<u8>::with_capacity(n);
            touch(v.as_mut_ptr(), n);
            if (n + seed).is_multiple_of(3) && n <= 4 << 20 {
                kept.push(v);
            }
        }
        size *= 2;
    }
    // Free the kept ones from the middle out.
    while !kept.is_empty() {
        let i = kept.len() / 2;
        kept.swap_remove(i);
    }
}

/// A buffer grown by realloc from 1 KiB to 32 MiB (across the mmap threshold: mremap from
/// there on), then shrunk back below it.
fn reallocs() {
    let mut v: Vec<u8> = Vec::with_capacity(1024);
    while v.capacity() < 32 << 20 {
        // The vector stays empty: this asks for twice the capacity, and odd sizes on the way.
        let more = v.capacity() * 2 + 123;
        v.reserve_exact(more);
        touch(v.as_mut_ptr(), v.capacity());
    }
    for target in [8 << 20, 200 << 10, 100 << 10, 1000] {
        v.shrink_to(target);
        touch(v.as_mut_ptr(), v.capacity());
    }
}

/// Zeroed and over-aligned blocks (calloc, posix_memalign paths), big and small.
fn aligned() {
    for size in [1usize, 100, 4096, 100_000, 1 << 20, 16 << 20] {
        for align in [16usize, 64, 4096, 1 << 16] {
            let layout = Layout::from_size_align(size, align).expect("a valid layout");
            // SAFETY: the layout has a non-zero size; the block is checked, used and freed with
            // the same layout.
            unsafe {
                let p = alloc(layout);
                assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                touch(p, size);
                dealloc(p, layout);
                let z = alloc_zeroed(layout);
                assert!(!z.is_null() && *z == 0 && *z.add(size - 1) == 0);
                dealloc(z, layout);
            }
        }
    }
}

/// Many small blocks held at once and freed in a scattered order (consolidation, then the heap
/// trimmed with brk).
fn small_churn(seed: usize) {
    for round in 0..3 {
        let mut held: Vec<Vec<u8>> = (0..10_000)
            .map(|i| {
                // Not filled: a debug build writes a filled vector byte by byte.
                let mut v = Vec::with_capacity(1 + (i * 7 + seed + round) % 600);
                v.push(i as u8);
                v
            })
            .collect();
        let mut i = seed;
        while !held.is_empty() {
            i = (i * 31 + 17) % held.len();
            held.swap_remove(i);
        }
    }
}

/// All the single-thread patterns, in an order that depends on `seed`.
fn churn(seed: usize) {
    let patterns: [fn(usize); 4] = [sizes, |_| reallocs(), |_| aligned(), small_churn];
    for k in 0..patterns.len() {
        patterns[(seed + k) % patterns.len()](seed);
    }
}

/// Sends blocks of 100 B to 1.6 MB to `to`, and frees what comes from `from`: each block is
/// freed on another thread than the one that made it.
fn exchange(seed: usize, to: &Sender<Vec<u8>>, from: &Receiver<Vec<u8>>) {
    for i in 0..100 {
        let n = 100 << ((i + seed) % 15);
        let mut v = vec![0u8; n];
        touch(v.as_mut_ptr(), n);
        let _ = to.send(v);
        while let Ok(got) = from.try_recv() {
            drop(got);
        }
    }
}

/// `kind`'s filter, decoded before the threads start, so a thread can install it before its
/// first allocation: in `kiln-vmm` the API's connection threads once started under the filter,
/// and their first allocation is what opened files.
fn decoded(kind: ThreadKind) -> Arc<BpfProgram> {
    Arc::new(program(kind).expect("the embedded filter decodes"))
}

/// Installs `kind`'s filter on the calling thread, or ends the child saying why.
fn filtered(kind: ThreadKind, filter: &BpfProgram) {
    if let Err(e) = install_program(kind, filter) {
        eprintln!("{e}");
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(99) };
    }
}

/// `THREADS` threads, each installing `kind`'s filter, all churning at once and passing blocks
/// around a ring to be freed by the next. Threads of kinds that end (api, vcpu) end under their
/// filter and are joined; vmm-kind threads never end (the VMM thread does not), so they park
/// until the child exits.
fn many_threads(kind: ThreadKind) {
    let filter = decoded(kind);
    let start = Arc::new(Barrier::new(THREADS));
    let (done_tx, done) = channel::<()>();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| channel()).unzip();
    let mut handles = Vec::new();
    for (i, from) in receivers.into_iter().enumerate() {
        let to = senders[(i + 1) % THREADS].clone();
        let (start, done_tx, filter) = (start.clone(), done_tx.clone(), filter.clone());
        handles.push(
            thread::Builder::new()
                .name(format!("{kind}-{i}"))
                .spawn(move || {
                    filtered(kind, &filter);
                    start.wait();
                    churn(i);
                    exchange(i, &to, &from);
                    let _ = done_tx.send(());
                    if kind == ThreadKind::Vmm {
                        loop {
                            thread::park();
                        }
                    }
                })
                .expect("start a thread"),
        );
    }
    drop(senders);
    for _ in 0..THREADS {
        done.recv().expect("a thread ended early");
    }
    if kind != ThreadKind::Vmm {
        for h in handles {
            h.join().expect("a thread panicked");
        }
    }
}

/// Channels under contention, as the vCPU request/answer channels and the API's answers are
/// when busy: std's channels spin, then back off with `sched_yield`. Eight threads under `kind`'s
/// filter hammer one rendezvous channel whose receiver runs under the same filter. (vmm-kind
/// threads park at the end instead of ending, as the VMM thread never ends.)
fn contended_channels(kind: ThreadKind) {
    let filter = decoded(kind);
    let (tx, rx) = std::sync::mpsc::sync_channel::<usize>(0);
    let (done_tx, done) = channel::<()>();
    let finish = move |done_tx: Sender<()>| {
        let _ = done_tx.send(());
        if kind == ThreadKind::Vmm {
            loop {
                thread::park();
            }
        }
    };
    {
        let (filter, done_tx) = (filter.clone(), done_tx.clone());
        thread::spawn(move || {
            filtered(kind, &filter);
            let mut sum = 0usize;
            while let Ok(v) = rx.recv() {
                sum = sum.wrapping_add(v);
            }
            std::hint::black_box(sum);
            finish(done_tx);
        });
    }
    for i in 0..8 {
        let (tx, filter, done_tx) = (tx.clone(), filter.clone(), done_tx.clone());
        thread::spawn(move || {
            filtered(kind, &filter);
            for n in 0..5000 {
                let _ = tx.send(i * n);
            }
            drop(tx);
            finish(done_tx);
        });
    }
    drop(tx);
    for _ in 0..9 {
        done.recv().expect("a thread ended early");
    }
}

/// What a snapshot of a restored VM with a balloon does on the VMM thread: open
/// `/proc/self/pagemap` and read which pages of a private mapping were written.
fn pagemap_under_the_vmm_filter() {
    let vmm = decoded(ThreadKind::Vmm);
    let mut page = vec![0u8; 3 * 4096];
    let base = (page.as_mut_ptr() as u64).next_multiple_of(4096);
    let at = (base - page.as_ptr() as u64) as usize;
    page[at] = 1;
    filtered(ThreadKind::Vmm, &vmm);
    let mut map = kiln_vmm::memory::pagemap::Pagemap::open().expect("open /proc/self/pagemap");
    let mut written = 0;
    map.private_copies(base, 1, |_| written += 1)
        .expect("read the page map");
    assert_eq!(written, 1, "a written heap page is a private copy");
}

/// As `kiln-vmm` runs: vCPU threads and the API thread under their filters, then the main
/// thread under the VMM filter, all allocating at once and freeing each other's blocks.
fn like_kiln_vmm() {
    let start = Arc::new(Barrier::new(6));
    let (to_main, from_others) = channel::<Vec<u8>>();
    let (done_tx, done) = channel::<()>();
    let mut others = Vec::new();
    let (api, vcpu, vmm) = (
        decoded(ThreadKind::Api),
        decoded(ThreadKind::Vcpu),
        decoded(ThreadKind::Vmm),
    );
    let kinds = [(ThreadKind::Api, api)]
        .into_iter()
        .chain((0..4).map(|_| (ThreadKind::Vcpu, vcpu.clone())));
    for (i, (kind, filter)) in kinds.enumerate() {
        let (start, to_main, done_tx) = (start.clone(), to_main.clone(), done_tx.clone());
        let (to_me, from_main) = channel::<Vec<u8>>();
        others.push(to_me);
        thread::Builder::new()
            .name(format!("{kind}-{i}"))
            .spawn(move || {
                filtered(kind, &filter);
                start.wait();
                churn(i);
                exchange(i, &to_main, &from_main);
                let _ = done_tx.send(());
            })
            .expect("start a thread");
    }
    drop(to_main);
    filtered(ThreadKind::Vmm, &vmm);
    start.wait();
    churn(99);
    let mut n = 0;
    while let Ok(block) = from_others.recv() {
        // Send some back to be freed over there; free the rest here.
        if n % 2 == 0 {
            let _ = others[n % others.len()].send(block);
        }
        n += 1;
    }
    for _ in 0..5 {
        done.recv().expect("a thread ended early");
    }
}

/// Runs `scenario` in a forked child with its stderr captured.
fn fork_child(configure: bool, scenario: fn()) -> Outcome {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: this process has one thread (no libtest here), so the child may do anything.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: descriptor juggling and an alarm in the child, before it does anything else.
        unsafe {
            libc::dup2(fds[1], 2);
            libc::close(fds[0]);
            libc::close(fds[1]);
            libc::alarm(CHILD_SECONDS);
        }
        if configure && let Err(e) = malloc::configure() {
            eprintln!("{e}");
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(98) };
        }
        scenario();
        // SAFETY: ends the whole child, parked threads included.
        unsafe { libc::_exit(0) };
    }
    let mut stderr = String::new();
    // SAFETY: the write end is the child's; the read end is ours alone from here.
    unsafe {
        libc::close(fds[1]);
        let _ = std::fs::File::from_raw_fd(fds[0]).read_to_string(&mut stderr);
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked, into a valid status word.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    Outcome {
        exit: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        stderr,
    }
}

/// A scenario: its name, whether the child configures malloc first, what it runs, how it ends.
type Scenario = (&'static str, bool, fn(), Expect);

fn main() {
    let scenarios: [Scenario; 9] = [
        (
            "contended channels, api",
            true,
            || contended_channels(ThreadKind::Api),
            Expect::Clean,
        ),
        (
            "contended channels, vcpu",
            true,
            || contended_channels(ThreadKind::Vcpu),
            Expect::Clean,
        ),
        (
            "contended channels, vmm",
            true,
            || contended_channels(ThreadKind::Vmm),
            Expect::Clean,
        ),
        (
            "16 api threads",
            true,
            || many_threads(ThreadKind::Api),
            Expect::Clean,
        ),
        (
            "16 vcpu threads",
            true,
            || many_threads(ThreadKind::Vcpu),
            Expect::Clean,
        ),
        (
            "16 vmm-filtered threads",
            true,
            || many_threads(ThreadKind::Vmm),
            Expect::Clean,
        ),
        ("kiln-vmm's threads", true, like_kiln_vmm, Expect::Clean),
        (
            "the page map under the vmm filter",
            true,
            pagemap_under_the_vmm_filter,
            Expect::Clean,
        ),
        (
            "control: 16 api threads without malloc::configure",
            false,
            || many_threads(ThreadKind::Api),
            Expect::Stopped,
        ),
    ];
    let mut failed = 0;
    let total = scenarios.len();
    println!("running {total} allocation scenarios");
    for (name, configure, scenario, expect) in scenarios {
        let start = Instant::now();
        let outcome = fork_child(configure, scenario);
        let ok = match expect {
            Expect::Clean => outcome.exit == Some(0) && outcome.signal.is_none(),
            Expect::Stopped => {
                outcome.exit == Some(EXIT_BAD_SYSCALL)
                    && outcome.stderr.contains(" made a forbidden system call ")
            }
        };
        println!(
            "test {name} ... {} ({:.1} s; exit {:?}, signal {:?})",
            if ok { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64(),
            outcome.exit,
            outcome.signal
        );
        if !ok || !outcome.stderr.is_empty() {
            println!("  its stderr: {}", outcome.stderr.trim_end());
        }
        failed += usize::from(!ok);
    }
    if failed > 0 {
        println!("{failed} scenario(s) failed");
        std::process::exit(1);
    }
    println!("test result: ok. {total} scenarios passed");
}
