//! Tests of memory files: data ranges of sparse files, page writes, and merging diffs.

use std::fs::{self, OpenOptions};
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::atomic::is_temporary_name;
use crate::bitmap::PageBitmap;
use crate::test_util::TestDir;

const P: u64 = PAGE_SIZE;

/// One page of `tag` bytes, stamped with its page number so that no two pages look alike.
fn page(tag: u8, index: u64) -> Vec<u8> {
    let mut bytes = vec![tag; P as usize];
    bytes[..8].copy_from_slice(&index.to_le_bytes());
    bytes
}

/// A sparse file of `pages` pages whose listed pages are data with `tag` content.
fn sparse_file(path: &Path, pages: u64, tag: u8, data: &[u64]) {
    let file = File::create(path).unwrap();
    file.set_len(pages * P).unwrap();
    for &i in data {
        write_pages(&file, path, i * P, &page(tag, i)).unwrap();
    }
}

fn ranges_of(path: &Path) -> Vec<Range<u64>> {
    data_ranges(&File::open(path).unwrap(), path).unwrap()
}

fn pages(range: Range<u64>) -> Range<u64> {
    range.start * P..range.end * P
}

fn temporaries(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| is_temporary_name(&e.as_ref().unwrap().file_name()))
        .count()
}

#[test]
fn data_ranges_of_a_sparse_file() {
    let dir = TestDir::new("memfile-ranges");
    let path = dir.path().join("mem");
    sparse_file(&path, 16, 0xaa, &[2, 3, 7, 15]);
    assert_eq!(
        ranges_of(&path),
        vec![pages(2..4), pages(7..8), pages(15..16)]
    );

    // All holes, and empty.
    sparse_file(&path, 16, 0xaa, &[]);
    assert_eq!(ranges_of(&path), vec![]);
    File::create(&path).unwrap();
    assert_eq!(ranges_of(&path), vec![]);

    // Data to the very end, the end not on a page boundary: the last range stops at the end.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(4 * P).unwrap();
    file.write_all_at(&[1; 100], 4 * P).unwrap();
    assert_eq!(ranges_of(&path), vec![4 * P..4 * P + 100]);
}

#[test]
fn write_pages_refuses_unaligned_writes_and_keeps_zero_pages_as_data() {
    let dir = TestDir::new("memfile-write");
    let path = dir.path().join("diff");
    let file = File::create(&path).unwrap();
    file.set_len(8 * P).unwrap();
    for (offset, len) in [(1, P), (0, P - 1), (P / 2, P)] {
        let err = write_pages(&file, &path, offset, &vec![0; len as usize]).unwrap_err();
        assert!(matches!(err, MemFileError::Unaligned { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
    write_pages(&file, &path, 3 * P, &vec![0; 2 * P as usize]).unwrap();
    assert_eq!(ranges_of(&path), vec![pages(3..5)]);
}

#[test]
fn dirty_ranges_from_a_memfd_become_data_even_where_zero() {
    let dir = TestDir::new("memfile-dirty");
    // Guest memory as the VMM has it: a memfd (another file system than the diff's, so the copy
    // cannot be done by copy_file_range and is done by hand).
    // SAFETY: the name is a NUL-terminated literal; the fd returned is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"kiln-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let guest = unsafe { File::from_raw_fd(fd) };
    let guest_path = Path::new("guest memory");
    guest.set_len(256 * P).unwrap();
    write_pages(&guest, guest_path, 5 * P, &page(0x11, 5)).unwrap();
    write_pages(&guest, guest_path, 70 * P, &page(0x22, 70)).unwrap();

    // Pages 4..=6 and 70 are dirty; 4 and 6 are holes (zeros) in the guest memory file.
    let mut dirty = PageBitmap::clean(256);
    for p in [4, 5, 6, 70] {
        dirty.set_dirty(p);
    }
    let path = dir.path().join("diff");
    let diff = File::create(&path).unwrap();
    diff.set_len(256 * P).unwrap();
    let copied =
        copy_dirty_ranges((&guest, guest_path), (&diff, &path), &dirty.byte_ranges()).unwrap();
    assert_eq!(copied, 4 * P);
    assert_eq!(ranges_of(&path), vec![pages(4..7), pages(70..71)]);
    let content = fs::read(&path).unwrap();
    assert_eq!(
        &content[pages(5..6).start as usize..][..P as usize],
        page(0x11, 5)
    );
    assert!(
        content[pages(4..5).start as usize..][..P as usize]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn fill_holes_makes_a_range_data_and_keeps_its_data() {
    let dir = TestDir::new("memfile-fill");
    let path = dir.path().join("diff");
    sparse_file(&path, 8, 0x33, &[2]);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // Runs past the end of the file too.
    fill_holes(&file, &path, pages(1..10)).unwrap();
    assert_eq!(ranges_of(&path), vec![pages(1..10)]);
    let content = fs::read(&path).unwrap();
    assert_eq!(content.len() as u64, 10 * P);
    assert_eq!(
        &content[pages(2..3).start as usize..][..P as usize],
        page(0x33, 2)
    );
}

#[test]
fn copy_by_hand_copies_and_notices_a_short_source() {
    let dir = TestDir::new("memfile-byhand");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    sparse_file(&a, 4, 0x44, &[0, 1, 2, 3]);
    File::create(&b).unwrap();
    let from = File::open(&a).unwrap();
    let to = OpenOptions::new().write(true).open(&b).unwrap();
    copy_by_hand(&from, &to, pages(1..3)).unwrap();
    let content = fs::read(&b).unwrap();
    assert_eq!(content.len() as u64, 3 * P);
    assert_eq!(&content[P as usize..2 * P as usize], page(0x44, 1));
    assert!(matches!(copy_by_hand(&from, &to, pages(3..5)), Err(None)));
    // copy_file_range notices it too.
    let err = copy_ranges((&from, &a), (&to, &b), &[pages(3..5)]).unwrap_err();
    assert!(matches!(err, MemFileError::ShortCopy { .. }), "{err}");
}

/// A base of 16 pages (0..8 and 12..16 data, 8..12 holes) and two diffs that overlap.
struct MergeSetup {
    dir: TestDir,
    base: PathBuf,
    diff1: PathBuf,
    diff2: PathBuf,
}

fn merge_setup(tag: &str) -> MergeSetup {
    let dir = TestDir::new(tag);
    let base = dir.path().join("mem");
    let diff1 = dir.path().join("mem.diff1");
    let diff2 = dir.path().join("mem.diff2");
    let base_pages: Vec<u64> = (0..8).chain(12..16).collect();
    sparse_file(&base, 16, 0xb0, &base_pages);
    // Diff 1: pages 1, 2, 9 (a base hole), and page 3 dirtied to all zeros.
    sparse_file(&diff1, 16, 0xd1, &[1, 2, 9]);
    let file = OpenOptions::new().write(true).open(&diff1).unwrap();
    write_pages(&file, &diff1, 3 * P, &vec![0; P as usize]).unwrap();
    // Diff 2, shorter than the base (the VM's memory was never shrunk, but the writer stopped at
    // its last dirty page): pages 2 and 9 again, later than diff 1.
    sparse_file(&diff2, 10, 0xd2, &[2, 9]);
    MergeSetup {
        dir,
        base,
        diff1,
        diff2,
    }
}

#[test]
fn merge_applies_diffs_in_order_and_keeps_holes() {
    let s = merge_setup("memfile-merge");
    fs::set_permissions(&s.base, fs::Permissions::from_mode(0o640)).unwrap();
    let stats = merge(&s.base, &[s.diff1.clone(), s.diff2.clone()]).unwrap();
    assert_eq!(
        stats,
        MergeStats {
            base_bytes: 12 * P,
            diff_bytes: vec![4 * P, 2 * P],
        }
    );

    let merged = fs::read(&s.base).unwrap();
    assert_eq!(merged.len() as u64, 16 * P);
    for i in 0..16u64 {
        let got = &merged[(i * P) as usize..((i + 1) * P) as usize];
        let want = match i {
            1 => page(0xd1, 1),
            2 | 9 => page(0xd2, i),
            3 | 8 | 10 | 11 => vec![0; P as usize],
            _ => page(0xb0, i),
        };
        assert!(got == want.as_slice(), "page {i} differs");
    }
    // The base's holes that no diff touched are still holes.
    let ranges = ranges_of(&s.base);
    for hole in [8, 10, 11] {
        let h = pages(hole..hole + 1);
        assert!(
            ranges.iter().all(|r| r.end <= h.start || r.start >= h.end),
            "page {hole} became data: {ranges:?}"
        );
    }
    assert_eq!(ranges, vec![pages(0..8), pages(9..10), pages(12..16)]);
    let mode = fs::metadata(&s.base).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(temporaries(s.dir.path()), 0);

    // With no diffs, the base is rewritten as it was.
    let stats = merge(&s.base, &[]).unwrap();
    assert_eq!(stats.diff_bytes, Vec::<u64>::new());
    assert_eq!(fs::read(&s.base).unwrap(), merged);
}

#[test]
fn merge_refuses_a_missing_diff_and_leaves_the_base() {
    let s = merge_setup("memfile-missing");
    let before = fs::read(&s.base).unwrap();
    let missing = s.dir.path().join("mem.diff3");
    let err = merge(&s.base, &[s.diff1.clone(), missing.clone()]).unwrap_err();
    assert!(
        matches!(&err, MemFileError::Missing(p) if *p == missing),
        "{err}"
    );
    assert!(err.to_string().contains(&missing.display().to_string()));
    assert_eq!(fs::read(&s.base).unwrap(), before);
    assert_eq!(temporaries(s.dir.path()), 0);

    let no_base = s.dir.path().join("nothing");
    let err = merge(&no_base, std::slice::from_ref(&s.diff1)).unwrap_err();
    assert!(
        matches!(&err, MemFileError::Missing(p) if *p == no_base),
        "{err}"
    );
}

#[test]
fn merge_refuses_a_diff_larger_than_the_base_and_leaves_the_base() {
    let s = merge_setup("memfile-oversize");
    let before = fs::read(&s.base).unwrap();
    let big = s.dir.path().join("mem.big");
    sparse_file(&big, 17, 0xee, &[16]);
    let err = merge(&s.base, &[s.diff1.clone(), big.clone()]).unwrap_err();
    match &err {
        MemFileError::DiffLargerThanBase {
            diff,
            diff_len,
            base,
            base_len,
        } => {
            assert_eq!((diff, base), (&big, &s.base));
            assert_eq!((*diff_len, *base_len), (17 * P, 16 * P));
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    for part in [
        big.display().to_string(),
        s.base.display().to_string(),
        (17 * P).to_string(),
        (16 * P).to_string(),
    ] {
        assert!(msg.contains(&part), "{msg} lacks {part}");
    }
    assert_eq!(fs::read(&s.base).unwrap(), before);
    assert_eq!(temporaries(s.dir.path()), 0);
}
