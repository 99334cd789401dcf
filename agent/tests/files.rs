//! File operations over a real agent process: a 50 MiB round trip by checksum, modes, append,
//! listing, stat, removal, and the errors each names.

mod common;

use common::{Agent, HashWriter, Pattern, sha256_of};
use kiln_agent::client::{Error, WriteOptions};
use kiln_agent::protocol::{ErrorKind, FileKind};

fn kind_of<T: std::fmt::Debug>(r: Result<T, Error>) -> ErrorKind {
    match r {
        Err(Error::Agent { kind, .. }) => kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn fifty_mib_round_trip() {
    let agent = Agent::start("big-file");
    let c = agent.client();
    let len = 50u64 << 20;
    let path = agent.dir.join("a/b/c/big.bin");
    let p = path.to_str().unwrap();
    let written = c
        .write_file(p, Pattern::new(42, len), WriteOptions::default())
        .unwrap();
    assert_eq!(written, len);
    assert_eq!(c.stat(p).unwrap().size, len);
    let mut hw = HashWriter::default();
    assert_eq!(c.read_file(p, &mut hw).unwrap(), len);
    assert_eq!(hw.len, len);
    assert_eq!(hw.hex(), sha256_of(Pattern::new(42, len)));
}

#[test]
fn modes_append_and_errors() {
    let agent = Agent::start("modes");
    let c = agent.client();
    let dir = agent.dir.to_str().unwrap().to_string();
    let f = format!("{dir}/script.sh");
    let opts = WriteOptions {
        mode: Some(0o750),
        ..WriteOptions::default()
    };
    c.write_file(&f, &b"#!/bin/sh\necho one\n"[..], opts)
        .unwrap();
    let append = WriteOptions {
        append: true,
        ..WriteOptions::default()
    };
    c.write_file(&f, &b"echo two\n"[..], append).unwrap();
    let st = c.stat(&f).unwrap();
    assert_eq!((st.kind, st.mode, st.size), (FileKind::File, 0o750, 28));
    let out = c
        .run(kiln_agent::protocol::ExecSpec::new([f.as_str()]))
        .unwrap();
    assert_eq!(out.stdout, b"one\ntwo\n");

    let mut sink = Vec::new();
    assert_eq!(
        kind_of(c.read_file(&format!("{dir}/missing"), &mut sink)),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind_of(c.read_file(&dir, &mut sink)),
        ErrorKind::IsADirectory
    );
    assert_eq!(
        kind_of(c.read_file("relative/path", &mut sink)),
        ErrorKind::BadRequest
    );
    let no_parents = WriteOptions {
        parents: false,
        ..WriteOptions::default()
    };
    assert_eq!(
        kind_of(c.write_file(&format!("{dir}/nope/x"), &b"x"[..], no_parents.clone())),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind_of(c.write_file(
            &format!("{f}/under-a-file"),
            &b"x"[..],
            WriteOptions::default()
        )),
        ErrorKind::NotADirectory
    );
    // A failed write with more data than one window still ends with the error, not a hang.
    assert_eq!(
        kind_of(c.write_file(
            &format!("{dir}/nope/y"),
            Pattern::new(1, 4 << 20),
            no_parents
        )),
        ErrorKind::NotFound
    );
    assert!(c.ping().is_ok());
}

#[test]
fn list_stat_remove() {
    let agent = Agent::start("tree");
    let c = agent.client();
    let root = agent.dir.join("tree");
    let r = root.to_str().unwrap();
    c.write_file(
        &format!("{r}/file.txt"),
        &b"12345"[..],
        WriteOptions::default(),
    )
    .unwrap();
    c.write_file(
        &format!("{r}/sub/inner.txt"),
        &b"x"[..],
        WriteOptions::default(),
    )
    .unwrap();
    std::os::unix::fs::symlink("file.txt", root.join("link")).unwrap();

    let mut entries = c.list_dir(r).unwrap();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let summary: Vec<(&str, FileKind)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.stat.kind))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("file.txt", FileKind::File),
            ("link", FileKind::Symlink),
            ("sub", FileKind::Dir)
        ]
    );
    assert_eq!(entries[0].stat.size, 5);
    // stat follows the link.
    assert_eq!(c.stat(&format!("{r}/link")).unwrap().kind, FileKind::File);

    assert_eq!(
        kind_of(c.remove(&format!("{r}/sub"), false)),
        ErrorKind::DirectoryNotEmpty
    );
    c.remove(&format!("{r}/link"), false).unwrap();
    assert_eq!(kind_of(c.stat(&format!("{r}/link"))), ErrorKind::NotFound);
    assert!(
        root.join("file.txt").exists(),
        "removing a link removed its target"
    );
    c.remove(r, true).unwrap();
    assert_eq!(kind_of(c.stat(r)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.list_dir(r)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.remove(r, true)), ErrorKind::NotFound);

    // Listings larger than one batch arrive whole.
    let many = agent.dir.join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..1000 {
        std::fs::write(many.join(format!("f{i}")), b"").unwrap();
    }
    assert_eq!(c.list_dir(many.to_str().unwrap()).unwrap().len(), 1000);
}
