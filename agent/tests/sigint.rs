//! SIGINT sent to the whole process reaches the agent's Ctrl-Alt-Del watcher, also when threads
//! started after it exist (they inherit the blocked mask, so none takes the signal's default
//! action). Runs without libtest's harness: its main thread would not block SIGINT.

use std::sync::mpsc;
use std::time::Duration;

use kiln_agent::guest::cad::watch_sigint;

fn main() {
    let (tx, rx) = mpsc::channel();
    watch_sigint(move || {
        let _ = tx.send(std::thread::current().name().map(String::from));
    })
    .expect("watch SIGINT");
    // A thread started later, as the agent's reaper and listeners are.
    let other = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(500)));
    // SAFETY: kill(2) on our own pid; SIGINT is blocked in every thread, so it stays pending
    // until the watcher's sigwait takes it.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGINT) }, 0);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the watcher ran");
    assert_eq!(got.as_deref(), Some("sigint"));
    other.join().unwrap();
    println!("sigint: ok");
}
