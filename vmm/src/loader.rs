//! Kernel, initrd and command-line loading.
//!
//! [`inspect_kernel`] reads just the headers, so configuration errors (not a kernel, too big for the
//! memory) are found before any KVM work. [`load_kernel`] then uses `linux-loader` to place an ELF
//! vmlinux (entered through PVH when it carries the Xen PHYS32 note, else at its 64-bit entry) or a
//! bzImage (entered at its 64-bit entry point).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::memory::GuestMemoryMmap;

/// Errors reading or placing the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file cannot be opened or read.
    #[error("kernel image {path}: {err}")]
    KernelIo {
        /// The kernel path.
        path: PathBuf,
        /// Why it failed.
        err: std::io::Error,
    },
    /// The kernel file has neither an ELF nor a bzImage header.
    #[error("kernel image {0} is not an ELF or bzImage")]
    NotAKernel(PathBuf),
    /// The kernel is an ELF, but not a 64-bit little-endian x86_64 one.
    #[error("kernel image {0} is an ELF file but not a 64-bit x86_64 one")]
    WrongElf(PathBuf),
    /// The kernel's headers are inconsistent.
    #[error("kernel image {path} is damaged: {what}")]
    Damaged {
        /// The kernel path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel image {path}: {err}")]
    Load {
        /// The kernel path.
        path: PathBuf,
        /// The loader's reason.
        err: linux_loader::loader::Error,
    },
    /// The initrd cannot be read or placed.
    #[error("initrd {path}: {what}")]
    Initrd {
        /// The initrd path.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The command line is unusable.
    #[error("kernel command line: {0}")]
    Cmdline(String),
}

/// The kernel formats Kiln boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed vmlinux.
    Elf,
    /// A bzImage.
    BzImage,
}

/// What the headers say about a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelInfo {
    /// Its format.
    pub format: KernelFormat,
    /// Lowest guest-physical address above everything the kernel occupies while booting.
    pub end: u64,
}

/// How the first vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64(GuestAddress),
    /// PVH: 32-bit protected mode without paging, `rbx` = `hvm_start_info`.
    Pvh(GuestAddress),
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where to start.
    pub entry: BootEntry,
    /// The bzImage setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const BZ_BOOT_FLAG: u16 = 0xaa55;
const BZ_HEADER_MAGIC: &[u8; 4] = b"HdrS";

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Reads a kernel's headers: its format and how much memory it needs.
pub fn inspect_kernel(path: &Path) -> Result<KernelInfo, LoaderError> {
    let io = |err| LoaderError::KernelIo {
        path: path.to_path_buf(),
        err,
    };
    let mut file = File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.is_dir() {
        return Err(io(std::io::Error::other("is a directory")));
    }
    let mut head = vec![0u8; 0x270];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    head.truncate(n);
    if head.starts_with(ELF_MAGIC) {
        return inspect_elf(path, &mut file, &head);
    }
    if head.len() >= 0x264
        && le16(&head, 0x1fe) == BZ_BOOT_FLAG
        && &head[0x202..0x206] == BZ_HEADER_MAGIC
    {
        // Setup header: pref_address at 0x258, init_size at 0x260 (protocol 2.10+).
        let base = le64(&head, 0x258).max(HIMEM_START);
        let init_size = u64::from(le32(&head, 0x260));
        return Ok(KernelInfo {
            format: KernelFormat::BzImage,
            end: base.saturating_add(init_size),
        });
    }
    Err(LoaderError::NotAKernel(path.to_path_buf()))
}

fn inspect_elf(path: &Path, file: &mut File, head: &[u8]) -> Result<KernelInfo, LoaderError> {
    let damaged = |what: &str| LoaderError::Damaged {
        path: path.to_path_buf(),
        what: what.into(),
    };
    // e_ident[EI_CLASS] = 2 (64-bit), e_ident[EI_DATA] = 1 (little endian), e_machine = x86_64.
    if head.len() < 64 || head[4] != 2 || head[5] != 1 || le16(head, 0x12) != EM_X86_64 {
        return Err(LoaderError::WrongElf(path.to_path_buf()));
    }
    let phoff = le64(head, 0x20);
    let phentsize = le16(head, 0x36);
    let phnum = le16(head, 0x38);
    if phentsize != 56 || phnum == 0 {
        return Err(damaged("no usable program headers"));
    }
    let mut table = vec![0u8; usize::from(phnum) * 56];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|_| damaged("program headers run past the end of the file"))?;
    let mut end = 0u64;
    for ph in table.chunks_exact(56) {
        if le32(ph, 0) == PT_LOAD {
            let top = le64(ph, 0x18)
                .checked_add(le64(ph, 0x28))
                .ok_or_else(|| damaged("a segment's address overflows"))?;
            end = end.max(top);
        }
    }
    if end == 0 {
        return Err(damaged("no loadable segments"));
    }
    Ok(KernelInfo {
        format: KernelFormat::Elf,
        end,
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let info = inspect_kernel(path)?;
    let mut file = File::open(path).map_err(|err| LoaderError::KernelIo {
        path: path.to_path_buf(),
        err,
    })?;
    let load_err = |err| LoaderError::Load {
        path: path.to_path_buf(),
        err,
    };
    match info.format {
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr),
                _ => BootEntry::Linux64(res.kernel_load),
            };
            Ok(LoadedKernel {
                entry,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            let entry = res
                .kernel_load
                .checked_add(0x200)
                .ok_or_else(|| LoaderError::Damaged {
                    path: path.to_path_buf(),
                    what: "load address overflows".into(),
                })?;
            Ok(LoadedKernel {
                entry: BootEntry::Linux64(entry),
                setup_header: res.setup_header,
            })
        }
    }
}

/// Places the initrd page-aligned at the top of RAM below `limit`; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    limit: u64,
) -> Result<(GuestAddress, u64), LoaderError> {
    let fail = |what: String| LoaderError::Initrd {
        path: path.to_path_buf(),
        what,
    };
    let mut file = File::open(path).map_err(|e| fail(e.to_string()))?;
    let size = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let addr = initrd_address(size, limit).ok_or_else(|| {
        fail(format!(
            "{size} bytes do not fit in guest memory below {limit:#x}"
        ))
    })?;
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| fail(e.to_string()))?;
    Ok((addr, size))
}

/// Where an initrd of `size` bytes goes when RAM usable for it ends at `limit`.
pub fn initrd_address(size: u64, limit: u64) -> Option<GuestAddress> {
    const PAGE: u64 = 4096;
    let start = limit.checked_sub(size)? & !(PAGE - 1);
    (start >= HIMEM_START).then_some(GuestAddress(start))
}

/// Builds the command line from `args` and writes it to [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemoryMmap, args: &str) -> Result<usize, LoaderError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(args)
        .map_err(|e| LoaderError::Cmdline(format!("{e} ({} bytes)", args.len())))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    Ok(args.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    /// A minimal x86_64 ELF with one PT_LOAD segment of `memsz` bytes at `paddr`.
    fn elf(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 + 16];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut b[64..120];
        ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[0x10..0x18].copy_from_slice(&paddr.to_le_bytes());
        ph[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
        ph[0x20..0x28].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        ph[0x28..0x30].copy_from_slice(&memsz.to_le_bytes());
        b[120..136].copy_from_slice(&[0xf4; 16]); // hlt
        b
    }

    #[test]
    fn elf_headers_give_the_memory_needed() {
        let path = temp_file("ok.elf", &elf(0x100_0000, 0x20_0000));
        let info = inspect_kernel(&path).unwrap();
        assert_eq!(
            info,
            KernelInfo {
                format: KernelFormat::Elf,
                end: 0x120_0000
            }
        );
    }

    #[test]
    fn bzimage_headers_are_recognised() {
        let mut b = vec![0u8; 0x300];
        b[0x1fe..0x200].copy_from_slice(&BZ_BOOT_FLAG.to_le_bytes());
        b[0x202..0x206].copy_from_slice(BZ_HEADER_MAGIC);
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes());
        let info = inspect_kernel(&temp_file("bz", &b)).unwrap();
        assert_eq!(
            info,
            KernelInfo {
                format: KernelFormat::BzImage,
                end: 0x180_0000
            }
        );
    }

    #[test]
    fn non_kernels_are_named() {
        let text = temp_file("notes.txt", b"hello, this is not a kernel");
        assert_eq!(
            inspect_kernel(&text).unwrap_err().to_string(),
            format!("kernel image {} is not an ELF or bzImage", text.display())
        );
        let empty = temp_file("empty", b"");
        assert!(matches!(
            inspect_kernel(&empty),
            Err(LoaderError::NotAKernel(_))
        ));
        let mut elf32 = elf(0x100_0000, 0x1000);
        elf32[4] = 1;
        assert!(matches!(
            inspect_kernel(&temp_file("e32", &elf32)),
            Err(LoaderError::WrongElf(_))
        ));
        let mut cut = elf(0x100_0000, 0x1000);
        cut.truncate(80);
        let err = inspect_kernel(&temp_file("cut", &cut))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("program headers run past the end of the file"),
            "{err}"
        );
        let missing = inspect_kernel(Path::new("/nonexistent/vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("kernel image /nonexistent/vmlinux: "),
            "{missing}"
        );
    }

    #[test]
    fn initrd_goes_page_aligned_below_the_limit() {
        assert_eq!(
            initrd_address(0x1800, 0x800_0000),
            Some(GuestAddress(0x7ff_e000))
        );
        assert_eq!(initrd_address(0x800_0000, 0x800_0000), None);
        assert_eq!(initrd_address(u64::MAX, 0x800_0000), None);
    }

    #[test]
    fn elf_kernel_loads_at_its_physical_address() {
        let path = temp_file("load.elf", &elf(0x20_0000, 0x1000));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let k = load_kernel(&mem, &path).unwrap();
        assert_eq!(k.entry, BootEntry::Linux64(GuestAddress(0x20_0000)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0xf4);
    }

    #[test]
    fn command_line_is_written_and_bounded() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        assert_eq!(load_cmdline(&mem, "console=ttyS0").unwrap(), 14);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }
}
