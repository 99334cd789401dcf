//! Revision 2 over a real agent process: a `keep` process outlives its connection and is found
//! again by pid and tag with the output it wrote meanwhile; the process list; stdin written and
//! closed and signals sent from another connection; the bound on output kept for nobody; tags
//! are unique; directories made, paths renamed, users resolved, owners and link targets named.

mod common;

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use common::Agent;
use kiln_agent::client::{Error, ExecOutput};
use kiln_agent::guest::procs::KEPT_OUTPUT;
use kiln_agent::protocol::{
    ErrorKind, ExecSpec, ExitStatus, MkdirSpec, PROTOCOL_REVISION, Selector,
};

fn keep(script: &str, tag: Option<&str>) -> ExecSpec {
    let mut spec = ExecSpec::new(["sh", "-c", script]);
    spec.keep = true;
    spec.tag = tag.map(String::from);
    spec
}

fn kind(e: Error) -> ErrorKind {
    match e {
        Error::Agent { kind, .. } => kind,
        other => panic!("expected an agent error, got {other}"),
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_kept_process_outlives_its_connection_and_is_found_again() {
    let agent = Agent::start("keep");
    let flag = agent.dir.join("go");
    let c = agent.client();
    assert_eq!(c.revision(), PROTOCOL_REVISION);
    let script = format!(
        "echo first; while [ ! -e {} ]; do sleep 0.05; done; echo second; echo err >&2; exit 7",
        flag.display()
    );
    let mut exec = c.exec(keep(&script, Some("job"))).unwrap();
    let pid = exec.pid();
    assert_eq!(
        exec.next_output().unwrap(),
        Some(ExecOutput::Stdout(b"first\n".to_vec()))
    );
    exec.detach();
    drop(c);

    // Another connection sees it running, by pid and by tag.
    let c2 = agent.client();
    let list = c2.processes().unwrap();
    let info = list.iter().find(|p| p.pid == pid).expect("listed");
    assert_eq!(info.tag.as_deref(), Some("job"));
    assert!(info.keep);
    assert_eq!(info.argv[0], "sh");
    // It writes while nobody follows; an attach by tag gets that output, then the exit.
    std::fs::write(&flag, "").unwrap();
    wait_for("the process to exit", || {
        !c2.processes().unwrap().iter().any(|p| p.pid == pid)
    });
    let out = c2
        .attach(Selector::Tag("job".into()))
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(out.status, ExitStatus::Exited(7));
    assert_eq!(out.stdout, b"second\n");
    assert_eq!(out.stderr, b"err\n");
    // Once its exit was reported it is gone.
    assert_eq!(
        kind(c2.attach(Selector::Pid(pid)).map(drop).unwrap_err()),
        ErrorKind::NotFound
    );
}

#[test]
fn stdin_and_signals_from_another_connection() {
    let agent = Agent::start("stdin");
    let a = agent.client();
    let mut spec = ExecSpec::new(["cat"]);
    spec.keep = true;
    spec.stdin = true;
    let exec = a.exec(spec).unwrap();
    let pid = exec.pid();
    let b = agent.client();
    assert_eq!(
        b.write_stdin(Selector::Pid(pid), &b"through another connection"[..])
            .unwrap(),
        26
    );
    b.close_stdin(Selector::Pid(pid)).unwrap();
    let out = exec.output().unwrap();
    assert_eq!(out.stdout, b"through another connection");
    assert_eq!(out.status, ExitStatus::Exited(0));

    // A second close, stdin of a process started without it, an unknown pid: named errors.
    let sleeper = a.exec(keep("sleep 30", None)).unwrap();
    let spid = sleeper.pid();
    let e = b
        .write_stdin(Selector::Pid(spid), &b"x"[..])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("process {spid} has no open stdin")),
        "{e}"
    );
    assert_eq!(
        kind(b.close_stdin(Selector::Pid(999_999)).unwrap_err()),
        ErrorKind::NotFound
    );
    // SIGKILL through the other connection; the first one sees it.
    b.signal_process(Selector::Pid(spid), libc::SIGKILL)
        .unwrap();
    assert_eq!(
        sleeper.output().unwrap().status,
        ExitStatus::Signaled(libc::SIGKILL)
    );
    assert_eq!(
        kind(
            b.signal_process(Selector::Pid(spid), libc::SIGTERM)
                .unwrap_err()
        ),
        ErrorKind::NotFound
    );
}

#[test]
fn tags_are_unique_and_plain_execs_die_with_their_connection() {
    let agent = Agent::start("tags");
    let c = agent.client();
    let first = c.exec(keep("sleep 30", Some("t"))).unwrap();
    let e = c.exec(keep("true", Some("t"))).map(drop).unwrap_err();
    assert_eq!(kind(e), ErrorKind::AlreadyExists);
    c.signal_process(Selector::Tag("t".into()), libc::SIGKILL)
        .unwrap();
    drop(first);

    let plain = c.exec(ExecSpec::new(["sleep", "30"])).unwrap();
    let pid = plain.pid();
    assert!(
        c.processes()
            .unwrap()
            .iter()
            .any(|p| p.pid == pid && !p.keep)
    );
    drop(plain);
    drop(c);
    let c2 = agent.client();
    wait_for("the plain exec to be killed", || {
        !c2.processes().unwrap().iter().any(|p| p.pid == pid)
    });
}

#[test]
fn output_kept_for_nobody_is_bounded_and_never_blocks_the_process() {
    let agent = Agent::start("bound");
    let c = agent.client();
    // 8 MiB of output with nobody following: the process must still finish.
    let exec = c
        .exec(keep(
            "head -c 8388608 /dev/zero | tr '\\0' a; echo; echo done >&2",
            Some("big"),
        ))
        .unwrap();
    let pid = exec.pid();
    exec.detach();
    wait_for("the writer to finish", || {
        !c.processes().unwrap().iter().any(|p| p.pid == pid)
    });
    let out = c.attach(Selector::Pid(pid)).unwrap().output().unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    let kept = out.stdout.len() + out.stderr.len();
    assert!(
        kept <= KEPT_OUTPUT + 64 * 1024,
        "kept {kept} bytes for nobody, more than {KEPT_OUTPUT}"
    );
    // The newest output is what is kept.
    assert_eq!(out.stderr, b"done\n");
    assert!(out.stdout.ends_with(b"aaa\n"));
}

#[test]
fn directories_renames_users_and_names() {
    let agent = Agent::start("dirs");
    let c = agent.client();
    let d = agent.dir.display().to_string();
    c.mkdir(MkdirSpec {
        path: format!("{d}/a/b/c"),
        parents: true,
        mode: None,
        owner: None,
    })
    .unwrap();
    assert!(agent.dir.join("a/b/c").is_dir());
    let again = c.mkdir(MkdirSpec {
        path: format!("{d}/a/b/c"),
        parents: true,
        mode: None,
        owner: None,
    });
    assert_eq!(kind(again.unwrap_err()), ErrorKind::AlreadyExists);
    let no_parent = c.mkdir(MkdirSpec {
        path: format!("{d}/x/y"),
        parents: false,
        mode: None,
        owner: None,
    });
    assert_eq!(kind(no_parent.unwrap_err()), ErrorKind::NotFound);

    std::fs::write(agent.dir.join("a/f"), "data").unwrap();
    c.rename(&format!("{d}/a/f"), &format!("{d}/new/dir/g"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(agent.dir.join("new/dir/g")).unwrap(),
        "data"
    );
    let e = c
        .rename(&format!("{d}/a/f"), &format!("{d}/h"))
        .unwrap_err();
    assert!(e.to_string().contains("/a/f"), "{e}");
    assert_eq!(kind(e), ErrorKind::NotFound);

    let root = c.resolve_user("0").unwrap();
    assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
    assert_eq!(root.name.as_deref(), Some("root"));
    assert_eq!(
        kind(c.resolve_user("no-such-user-here").unwrap_err()),
        ErrorKind::NotFound
    );

    // Stats name the owner and a link's target.
    std::os::unix::fs::symlink(agent.dir.join("new/dir/g"), agent.dir.join("link")).unwrap();
    let st = c.stat(&format!("{d}/link")).unwrap();
    assert_eq!(st.size, 4);
    assert_eq!(
        st.symlink_target.as_deref(),
        Some(agent.dir.join("new/dir/g").to_str().unwrap())
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(st.owner.as_deref(), Some("root"));
    }
    let listed = c.list_dir(&d).unwrap();
    let link = listed.iter().find(|e| e.name == "link").unwrap();
    assert!(link.stat.symlink_target.is_some());
}

#[test]
fn stdin_a_process_never_reads_fails_within_the_reply_timeout() {
    let agent = Agent::start("stdin-stuck");
    let a = agent.client();
    let mut spec = keep("sleep 60", None);
    spec.stdin = true;
    let sleeper = a.exec(spec).unwrap();
    let pid = sleeper.pid();
    let b = agent
        .client()
        .with_reply_timeout(Duration::from_millis(500));
    // Far more than the pipe and the agent's window hold: the writer runs out of credit.
    // (Without the reply timeout it would wait until `sleep` ends and fail otherwise.)
    let e = b
        .write_stdin(Selector::Pid(pid), std::io::repeat(b'x').take(64 << 20))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    // The connection still serves, and the process is still there to be killed.
    b.signal_process(Selector::Pid(pid), libc::SIGKILL).unwrap();
    assert_eq!(
        sleeper.output().unwrap().status,
        ExitStatus::Signaled(libc::SIGKILL)
    );
}
