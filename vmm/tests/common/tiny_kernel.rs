#![allow(dead_code)] // each test binary uses a different subset of these
//! A tiny hand-built guest kernel: an x86_64 ELF file with a few dozen instructions, optionally
//! with a PVH note. Pure bytes, no kiln-vmm, so other crates' tests can include this file too
//! (kiln-jailer's do, with `#[path]`).

/// Where the tiny guest is loaded and entered.
pub const LOAD_ADDR: u32 = 0x10_0000;
/// Offset of the code within the loaded image.
const CODE_OFFSET: u32 = 0x100;

/// What the tiny guest does.
#[derive(Clone, Copy)]
pub enum Program {
    /// Prints its greeting, which mode it runs in, whether an unclaimed MMIO read came back
    /// all-ones, then resets through the i8042.
    Hello,
    /// Prints a line, then executes `ud2` with no usable IDT: a triple fault.
    TripleFault,
    /// Echoes the first three bytes received on COM1 back out, then resets.
    Echo3,
    /// Counts forever in the 32-bit word at [`COUNTER_ADDR`], printing a `.` every 16384 counts.
    Counter,
    /// Polls the i8042 and copies the first 11 bytes it delivers (Ctrl-Alt-Del's scan codes) to
    /// COM1, then resets.
    Keys,
    /// A hostile driver for the virtio-blk device at [`BLK_MMIO`]: sets it up with one 256-entry
    /// queue of 64 requests, each reading [`FLOOD_READ`] bytes of the disk into one shared buffer,
    /// then keeps 64 to 96 of them outstanding forever, re-posting 32 whenever fewer than 64
    /// wait: the device never finds its queue empty.
    BlkFlood,
    /// Prints, as one digit and a newline, how many logical processors CPUID leaf 0xB puts at
    /// its first (SMT) level, i.e. threads a core, then resets.
    Threads,
}

/// Where the first virtio-mmio device (the only drive, with no vsock) sits.
pub const BLK_MMIO: u32 = 0xd000_0000;
/// Guest addresses of [`Program::BlkFlood`]'s queue (inside its loaded image).
const FLOOD_DESC: u32 = LOAD_ADDR + 0x1000;
const FLOOD_AVAIL: u32 = LOAD_ADDR + 0x2000;
const FLOOD_USED: u32 = LOAD_ADDR + 0x3000;
const FLOOD_HDR: u32 = LOAD_ADDR + 0x4000;
const FLOOD_STATUS: u32 = LOAD_ADDR + 0x5000;
/// Where [`Program::BlkFlood`]'s requests read into, and how much each reads.
pub const FLOOD_BUF: u32 = 0x100_0000;
/// Bytes each [`Program::BlkFlood`] request reads (the disk must hold at least this much).
pub const FLOOD_READ: u32 = 4 << 20;
/// Offsets, in guest memory (and so in a full snapshot's memory file), of [`Program::BlkFlood`]'s
/// avail index, used index and 64 status bytes.
pub const FLOOD_AVAIL_IDX: u32 = FLOOD_AVAIL + 2;
/// See [`FLOOD_AVAIL_IDX`].
pub const FLOOD_USED_IDX: u32 = FLOOD_USED + 2;
/// See [`FLOOD_AVAIL_IDX`].
pub const FLOOD_STATUSES: u32 = FLOOD_STATUS;

/// Where [`Program::Counter`] keeps its count (guest-physical, so also the memory file offset).
pub const COUNTER_ADDR: u32 = 0x20_0000;

pub const GREETING: &str = "hello from the tiny guest\n";

/// Machine code valid in both 32-bit protected mode (PVH entry) and 64-bit long mode: no REX
/// prefixes, absolute addresses only. `strings` is placed right after it.
fn hello_code(addr: impl Fn(&str) -> u32, len: impl Fn(&str) -> u32) -> Vec<u8> {
    let mut c = Vec::new();
    let print = |c: &mut Vec<u8>, ecx: u32| {
        c.extend_from_slice(&[0xb9]); // mov ecx, len
        c.extend_from_slice(&ecx.to_le_bytes());
        c.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc]); // 1: lodsb; out dx, al; loop 1b
    };
    c.extend_from_slice(&[0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8 (COM1)
    c.push(0xbe); // mov esi, greeting
    c.extend_from_slice(&addr("greeting").to_le_bytes());
    print(&mut c, len("greeting"));
    // Which mode: CR0.PG is set in long mode and clear on PVH entry.
    c.extend_from_slice(&[0x0f, 0x20, 0xc0]); // mov eax, cr0
    c.extend_from_slice(&[0xa9, 0x00, 0x00, 0x00, 0x80]); // test eax, 0x80000000
    c.push(0xbe);
    c.extend_from_slice(&addr("long").to_le_bytes()); // mov esi, "mode: long64"
    c.extend_from_slice(&[0x75, 0x05]); // jnz +5
    c.push(0xbe);
    c.extend_from_slice(&addr("pvh").to_le_bytes()); // mov esi, "mode: pvh-32"
    print(&mut c, len("long"));
    // An MMIO write and read nobody claims: the write is dropped, the read answers all-ones.
    c.extend_from_slice(&[0xb8, 0x00, 0x00, 0x00, 0xd0]); // mov eax, 0xd0000000
    c.extend_from_slice(&[0xc7, 0x00, 0x34, 0x12, 0x00, 0x00]); // mov dword [eax], 0x1234
    c.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [eax]
    c.extend_from_slice(&[0x83, 0xfb, 0xff]); // cmp ebx, -1
    c.push(0xbe);
    c.extend_from_slice(&addr("mmio_bad").to_le_bytes());
    c.extend_from_slice(&[0x75, 0x05]); // jne +5
    c.push(0xbe);
    c.extend_from_slice(&addr("mmio_ok").to_le_bytes());
    print(&mut c, len("mmio_ok"));
    c.extend_from_slice(&[0xe4, 0x64]); // in al, 0x64 (i8042 status)
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al: pulse reset
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 1: hlt; jmp 1b
    c
}

fn triple_fault_code(addr: impl Fn(&str) -> u32, len: impl Fn(&str) -> u32) -> Vec<u8> {
    let mut c = vec![0xba, 0xf8, 0x03, 0x00, 0x00, 0xbe];
    c.extend_from_slice(&addr("greeting").to_le_bytes());
    c.push(0xb9);
    c.extend_from_slice(&len("greeting").to_le_bytes());
    c.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc]);
    c.extend_from_slice(&[0x0f, 0x0b]); // ud2 -> #UD -> no IDT entry -> #DF -> triple fault
    c
}

fn echo3_code() -> Vec<u8> {
    vec![
        0xba, 0xfd, 0x03, 0x00, 0x00, // mov edx, 0x3fd (line status)
        0xb9, 0x03, 0x00, 0x00, 0x00, // mov ecx, 3
        0xec, // 1: in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz 1b
        0xb2, 0xf8, // mov dl, 0xf8 (data register)
        0xec, // in al, dx
        0xee, // out dx, al
        0xb2, 0xfd, // mov dl, 0xfd
        0xe2, 0xf3, // loop 1b
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al: reset
        0xf4, 0xeb, 0xfd, // 1: hlt; jmp 1b
    ]
}

fn keys_code() -> Vec<u8> {
    vec![
        0xb9, 0x0b, 0x00, 0x00, 0x00, // mov ecx, 11
        0xe4, 0x64, // 1: in al, 0x64 (i8042 status)
        0xa8, 0x01, // test al, 1 (output buffer full)
        0x74, 0xfa, // jz 1b
        0xe4, 0x60, // in al, 0x60 (i8042 data)
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0xee, // out dx, al
        0xe2, 0xf0, // loop 1b
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al: reset
        0xf4, 0xeb, 0xfd, // 1: hlt; jmp 1b
    ]
}

fn threads_code() -> Vec<u8> {
    vec![
        0xb8, 0x0b, 0x00, 0x00, 0x00, // mov eax, 0xb
        0x31, 0xc9, // xor ecx, ecx: sub-leaf 0, the SMT level
        0x0f, 0xa2, // cpuid
        0x88, 0xd8, // mov al, bl: logical processors at this level
        0x04, b'0', // add al, '0'
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8 (cpuid wrote edx)
        0xee, // out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al: reset
        0xf4, 0xeb, 0xfd, // 1: hlt; jmp 1b
    ]
}

fn counter_code() -> Vec<u8> {
    let mut c = vec![0xba, 0xf8, 0x03, 0x00, 0x00, 0xbb]; // mov edx, 0x3f8; mov ebx, COUNTER
    c.extend_from_slice(&COUNTER_ADDR.to_le_bytes());
    c.extend_from_slice(&[
        0xff, 0x03, // 1: inc dword [ebx]
        0x8b, 0x03, // mov eax, [ebx]
        0xa9, 0xff, 0x3f, 0x00, 0x00, // test eax, 0x3fff
        0x75, 0xf5, // jnz 1b
        0xb0, b'.', // mov al, '.'
        0xee, // out dx, al
        0xeb, 0xf0, // jmp 1b
    ]);
    c
}

fn blk_flood_code() -> Vec<u8> {
    let mut c = Vec::new();
    let mmio = |c: &mut Vec<u8>, reg: u32, value: u32| {
        c.push(0xb8); // mov eax, BLK_MMIO + reg
        c.extend_from_slice(&(BLK_MMIO + reg).to_le_bytes());
        c.extend_from_slice(&[0xc7, 0x00]); // mov dword [eax], value
        c.extend_from_slice(&value.to_le_bytes());
    };
    mmio(&mut c, 0x70, 1); // ACKNOWLEDGE
    mmio(&mut c, 0x70, 3); // DRIVER
    mmio(&mut c, 0x24, 1); // features page 1
    mmio(&mut c, 0x20, 1); // VIRTIO_F_VERSION_1
    mmio(&mut c, 0x70, 0xb); // FEATURES_OK
    mmio(&mut c, 0x30, 0); // queue 0
    mmio(&mut c, 0x38, 256);
    mmio(&mut c, 0x80, FLOOD_DESC);
    mmio(&mut c, 0x90, FLOOD_AVAIL);
    mmio(&mut c, 0xa0, FLOOD_USED);
    mmio(&mut c, 0x44, 1); // ready
    mmio(&mut c, 0x70, 0xf); // DRIVER_OK
    c.push(0xbb); // mov ebx, avail idx
    c.extend_from_slice(&(FLOOD_AVAIL + 2).to_le_bytes());
    c.push(0xb9); // mov ecx, used idx
    c.extend_from_slice(&(FLOOD_USED + 2).to_le_bytes());
    c.push(0xba); // mov edx, QueueNotify
    c.extend_from_slice(&(BLK_MMIO + 0x50).to_le_bytes());
    c.extend_from_slice(&[
        0x66, 0x8b, 0x03, // 1: mov ax, [ebx]
        0x66, 0x2b, 0x01, // sub ax, [ecx]: requests outstanding
        0x66, 0x3d, 0x40, 0x00, // cmp ax, 64
        0x73, 0xf4, // jae 1b: enough outstanding, keep watching
        0x66, 0x81, 0x03, 0x20, 0x00, // add word [ebx], 32: post 32 more
        0xc7, 0x02, 0x00, 0x00, 0x00, 0x00, // mov dword [edx], 0: notify queue 0
        0xeb, 0xe7, // jmp 1b
    ]);
    c
}

/// [`Program::BlkFlood`]'s queue, placed in the image at its guest addresses: 64 chains (a
/// header reading sector 0, a [`FLOOD_READ`]-byte buffer, a status byte), every avail slot
/// naming one of them.
fn blk_flood_tables(image: &mut Vec<u8>) {
    let at = |addr: u32| (addr - LOAD_ADDR) as usize;
    image.resize(at(FLOOD_STATUS) + 0x1000, 0);
    let desc = |addr: u32, len: u32, flags: u16, next: u16| {
        [
            u64::from(addr).to_le_bytes().as_slice(),
            &len.to_le_bytes(),
            &flags.to_le_bytes(),
            &next.to_le_bytes(),
        ]
        .concat()
    };
    for i in 0..64u16 {
        let d = at(FLOOD_DESC) + 48 * usize::from(i);
        let (next, write) = (1u16, 2u16);
        image[d..d + 16].copy_from_slice(&desc(FLOOD_HDR, 16, next, 3 * i + 1));
        image[d + 16..d + 32].copy_from_slice(&desc(
            FLOOD_BUF,
            FLOOD_READ,
            next | write,
            3 * i + 2,
        ));
        image[d + 32..d + 48].copy_from_slice(&desc(FLOOD_STATUS + u32::from(i), 1, write, 0));
    }
    for slot in 0..256usize {
        let a = at(FLOOD_AVAIL) + 4 + 2 * slot;
        image[a..a + 2].copy_from_slice(&(3 * (slot % 64) as u16).to_le_bytes());
    }
    // The header (request type IN, sector 0) is all zeroes already.
}

const STRINGS: &[(&str, &str)] = &[
    ("greeting", GREETING),
    ("long", "mode: long64\n"),
    ("pvh", "mode: pvh-32\n"),
    ("mmio_ok", "mmio: all-ones\n"),
    ("mmio_bad", "mmio: wrong!!\n"),
];

/// The tiny guest as an x86_64 ELF image, with a PVH entry note when `pvh` is set.
pub fn tiny_kernel(program: Program, pvh: bool) -> Vec<u8> {
    // Code is at most 0x100 bytes; strings follow at a fixed offset so addresses are known up front.
    let strings_off = CODE_OFFSET + 0x100;
    let mut offsets = Vec::new();
    let mut data = Vec::new();
    for (name, text) in STRINGS {
        offsets.push((*name, strings_off + data.len() as u32, text.len() as u32));
        data.extend_from_slice(text.as_bytes());
    }
    let find = |n: &str| {
        offsets
            .iter()
            .find(|(k, _, _)| *k == n)
            .copied()
            .unwrap_or(("", 0, 0))
    };
    let addr = |n: &str| LOAD_ADDR + find(n).1;
    let len = |n: &str| find(n).2;
    let code = match program {
        Program::Hello => hello_code(addr, len),
        Program::TripleFault => triple_fault_code(addr, len),
        Program::Echo3 => echo3_code(),
        Program::Counter => counter_code(),
        Program::Keys => keys_code(),
        Program::BlkFlood => blk_flood_code(),
        Program::Threads => threads_code(),
    };
    assert!(code.len() <= 0x100);

    let mut image = vec![0u8; strings_off as usize];
    image[CODE_OFFSET as usize..CODE_OFFSET as usize + code.len()].copy_from_slice(&code);
    image.extend_from_slice(&data);
    if let Program::BlkFlood = program {
        blk_flood_tables(&mut image);
    }
    let note_off = image.len().next_multiple_of(4);
    image.resize(note_off, 0);
    // Xen PHYS32_ENTRY note: namesz 4, descsz 4, type 18, "Xen\0", 32-bit entry address.
    for v in [4u32, 4, 18] {
        image.extend_from_slice(&v.to_le_bytes());
    }
    image.extend_from_slice(b"Xen\0");
    image.extend_from_slice(&(LOAD_ADDR + CODE_OFFSET).to_le_bytes());
    let note_len = image.len() - note_off;

    // ELF header and program headers occupy the start of the (loaded) image, below the code.
    let phnum: u16 = if pvh { 2 } else { 1 };
    let h = &mut image[..64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little endian
    h[6] = 1; // version
    h[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    h[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    h[0x18..0x20].copy_from_slice(&u64::from(LOAD_ADDR + CODE_OFFSET).to_le_bytes()); // e_entry
    h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    h[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    let total = image.len() as u64;
    let load = phdr(1, 0, u64::from(LOAD_ADDR), total, total);
    image[64..120].copy_from_slice(&load);
    if pvh {
        let note = phdr(4, note_off as u64, 0, note_len as u64, note_len as u64);
        image[120..176].copy_from_slice(&note);
    }
    image
}

fn phdr(kind: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) -> [u8; 56] {
    let mut p = [0u8; 56];
    p[..4].copy_from_slice(&kind.to_le_bytes());
    p[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    p[8..16].copy_from_slice(&offset.to_le_bytes());
    p[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    p[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    p[32..40].copy_from_slice(&filesz.to_le_bytes());
    p[40..48].copy_from_slice(&memsz.to_le_bytes());
    p[48..56].copy_from_slice(&4u64.to_le_bytes());
    p
}
