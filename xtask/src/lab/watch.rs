//! Seeing what L1 is doing. L1's kernel console is its second serial port (ttyS1), which QEMU writes
//! to a file: kernel messages never mix with CMD's output on ttyS0, and the host follows the file
//! ([`KernelLog`]). Init writes a heartbeat there every few seconds; when it stops, L1's userspace no
//! longer runs, and [`cpu_report`] asks QEMU over QMP where each L1 CPU is, naming the kernel
//! function (System.map) or module (`/proc/modules`, which init prints at boot).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::init::{self, Marker};

/// How often init writes a heartbeat to ttyS1 (the script's `sleep`).
pub const BEAT_EVERY_SECS: u32 = 5;

/// L1's kernel console as the host follows it.
pub struct KernelLog {
    path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
    /// Every line L1's kernel (or init) wrote there, heartbeats left out.
    pub text: String,
    last_beat: Option<Instant>,
}

impl KernelLog {
    /// Follows `path` (QEMU creates it when it starts).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            partial: Vec::new(),
            text: String::new(),
            last_beat: None,
        }
    }

    /// Reads what L1 wrote since the last call.
    pub fn poll(&mut self) {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() {
            return;
        }
        self.partial.extend_from_slice(&buf);
        while let Some(nl) = self.partial.iter().position(|&c| c == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&raw);
            let line = text.trim_end_matches('\n').trim_end_matches('\r');
            let (before, marker) = init::parse_line(line);
            if marker == Some(Marker::Beat) {
                self.last_beat = Some(Instant::now());
                if before.is_empty() {
                    continue;
                }
            }
            let kept = if marker == Some(Marker::Beat) {
                before
            } else {
                line
            };
            self.text.push_str(kept);
            self.text.push('\n');
        }
    }

    /// Time since the last heartbeat; `None` before the first.
    pub fn since_beat(&self) -> Option<Duration> {
        self.last_beat.map(|t| t.elapsed())
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A sorted list of code symbols: `(address or offset, name)`.
#[derive(Default)]
struct Symbols(Vec<(u64, String)>);

impl Symbols {
    fn sort(mut self) -> Self {
        self.0.sort_unstable_by_key(|(a, _)| *a);
        self
    }

    /// `name+0xoff` for the nearest symbol at or below `addr`, within 1 MiB of it.
    fn name(&self, addr: u64) -> Option<String> {
        let i = self.0.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.0[i];
        let off = addr - base;
        (off < (1 << 20)).then(|| format!("{name}+{off:#x}"))
    }
}

/// L1's code symbols: the kernel's by address (L1 boots with `nokaslr`, so they hold on every
/// boot) and each module's by offset from its base (modules land elsewhere on each boot; the
/// kernel log's `/proc/modules` lines say where).
#[derive(Default)]
pub struct SymbolMap {
    kernel: Symbols,
    modules: std::collections::HashMap<String, Symbols>,
}

impl SymbolMap {
    /// Reads the saved form ([`save_kallsyms`]): `K ADDR NAME` and `M MODULE OFFSET NAME` lines.
    pub fn parse(text: &str) -> Self {
        let mut map = SymbolMap::default();
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["K", addr, name] => {
                    if let Ok(a) = u64::from_str_radix(addr, 16) {
                        map.kernel.0.push((a, name.to_string()));
                    }
                }
                ["M", module, off, name] => {
                    if let Ok(o) = u64::from_str_radix(off, 16) {
                        map.modules
                            .entry(module.to_string())
                            .or_default()
                            .0
                            .push((o, name.to_string()));
                    }
                }
                _ => {}
            }
        }
        map.kernel = std::mem::take(&mut map.kernel).sort();
        for syms in map.modules.values_mut() {
            *syms = std::mem::take(syms).sort();
        }
        map
    }

    /// Loads `path`; a missing file gives an empty map (addresses stay unnamed).
    pub fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }
}

/// Turns one boot's `/proc/kallsyms` code symbols (`ADDR TYPE NAME [MODULE]`) into the saved form
/// [`SymbolMap::parse`] reads, with module symbols relative to the bases `kernel_log`'s
/// `/proc/modules` lines give for that boot.
pub fn save_kallsyms(raw: &str, kernel_log: &str) -> String {
    let mods = modules(kernel_log);
    let mut out = String::new();
    for line in raw.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (addr, kind, name) = match w.as_slice() {
            [a, k, n, ..] => (a, k, n),
            _ => continue,
        };
        if !matches!(*kind, "t" | "T" | "w" | "W") {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        match w.get(3).map(|m| m.trim_matches(['[', ']'])) {
            None => out.push_str(&format!("K {addr:x} {name}\n")),
            Some(module) => {
                if let Some(m) = mods.iter().find(|m| m.name == module)
                    && addr >= m.base
                {
                    out.push_str(&format!("M {module} {:x} {name}\n", addr - m.base));
                }
            }
        }
    }
    out
}

/// A loaded module's range, from a `/proc/modules` line in the kernel log.
struct Module {
    name: String,
    base: u64,
    size: u64,
}

/// The modules `/proc/modules` lines in `log` list (`NAME SIZE REFS DEPS Live 0xADDR`).
fn modules(log: &str) -> Vec<Module> {
    log.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let (name, size, state, addr) = (w.first()?, w.get(1)?, w.get(4)?, w.get(5)?);
            if *state != "Live" {
                return None;
            }
            Some(Module {
                name: name.to_string(),
                size: size.parse().ok()?,
                base: u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?,
            })
        })
        .collect()
}

/// What an L1 address is: a kernel function, a function in a module, or user space.
fn describe_rip(rip: u64, cpl: &str, map: &SymbolMap, mods: &[Module]) -> String {
    if cpl == "3" {
        return "user space".into();
    }
    if let Some(m) = mods
        .iter()
        .find(|m| rip >= m.base && rip < m.base.saturating_add(m.size))
    {
        let off = rip - m.base;
        return match map.modules.get(&m.name).and_then(|s| s.name(off)) {
            Some(name) => format!("{name} [{}]", m.name),
            None => format!("{}+{off:#x}", m.name),
        };
    }
    map.kernel
        .name(rip)
        .unwrap_or_else(|| "not in L1's kernel (an L2 guest, or no symbols saved)".into())
}

/// One QMP command (`execute` with `arguments`, if any) on a fresh connection; its `return`.
fn qmp(
    sock: &Path,
    execute: &str,
    arguments: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let stream = UnixStream::connect(sock).map_err(|e| format!("QMP {}: {e}", sock.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut answer = |request: &serde_json::Value| -> Result<serde_json::Value, String> {
        writeln!(writer, "{request}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => return Err("QMP closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("QMP read: {e}")),
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| format!("QMP sent something that is not JSON ({e}): {line}"))?;
            if v.get("return").is_some() {
                return Ok(v["return"].clone());
            }
            if let Some(err) = v.get("error") {
                return Err(format!("QMP error: {err}"));
            }
            // Greeting and asynchronous events: not our answer.
        }
    };
    answer(&serde_json::json!({"execute": "qmp_capabilities"}))?;
    let mut request = serde_json::json!({ "execute": execute });
    if let Some(arguments) = arguments {
        request["arguments"] = arguments;
    }
    answer(&request)
}

/// Runs the human monitor `command` over QMP (on CPU `cpu` when given: `x` reads memory
/// through that CPU's page tables) and returns its output.
fn hmp(sock: &Path, command: &str, cpu: Option<usize>) -> Result<String, String> {
    let mut arguments = serde_json::json!({"command-line": command});
    if let Some(cpu) = cpu {
        arguments["cpu-index"] = cpu.into();
    }
    let out = qmp(sock, "human-monitor-command", Some(arguments))?;
    Ok(out.as_str().unwrap_or_default().to_string())
}

/// Whether every one of L1's CPUs is halted (`None` if QEMU cannot say): an L1 that is silent
/// so is waiting for an interrupt, not busy.
pub fn all_halted(sock: &Path) -> Option<bool> {
    let states = cpu_states(&hmp(sock, "info registers -a", None).ok()?);
    (!states.is_empty()).then(|| states.iter().all(|s| s.halted))
}

/// Sends L1 a non-maskable interrupt, which takes a halted CPU out of `hlt` (Linux notes it as
/// an unknown NMI and goes on).
pub fn inject_nmi(sock: &Path) -> Result<(), String> {
    qmp(sock, "inject-nmi", None).map(|_| ())
}

/// One CPU's state, from `info registers -a`.
#[derive(Debug, PartialEq, Eq)]
struct CpuState {
    cpu: usize,
    rip: u64,
    rsp: u64,
    cpl: String,
    halted: bool,
    /// RFLAGS (bit 9 is IF: interrupts enabled).
    rflags: u64,
    /// In an interrupt shadow (after `sti` or `mov ss`).
    inhibit: bool,
}

/// Each CPU's state in `info registers -a` output.
fn cpu_states(text: &str) -> Vec<CpuState> {
    let mut out = Vec::new();
    let mut cpu = None;
    let mut rsp = 0;
    for line in text.lines() {
        if let Some(n) = line.trim().strip_prefix("CPU#") {
            cpu = n.trim().parse().ok();
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name).map(str::to_string))
        };
        if let Some(v) = field("RSP=") {
            rsp = u64::from_str_radix(&v, 16).unwrap_or(0);
        }
        if let (Some(c), Some(rip)) = (cpu, field("RIP="))
            && let Ok(rip) = u64::from_str_radix(&rip, 16)
        {
            let cpl = field("CPL=").unwrap_or_default();
            let halted = field("HLT=").as_deref() == Some("1");
            let rflags = field("RFL=").and_then(|v| u64::from_str_radix(&v, 16).ok());
            out.push(CpuState {
                cpu: c,
                rip,
                rsp,
                cpl,
                halted,
                rflags: rflags.unwrap_or(0),
                inhibit: field("II=").as_deref() == Some("1"),
            });
        }
    }
    out
}

/// The words of an `x /Ngx ADDR` dump (`ADDR: 0xWORD 0xWORD` lines).
fn dump_words(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split_once(':').map(|(_, words)| words))
        .flat_map(|words| words.split_whitespace())
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// The bytes around a CPU's RIP (from one before it): shows an `int3` (cc) a CPU keeps hitting,
/// or code that is not what it should be.
fn code_bytes(qmp: &Path, state: &CpuState) -> String {
    match hmp(
        qmp,
        &format!("x /12bx {:#x}", state.rip.wrapping_sub(1)),
        Some(state.cpu),
    ) {
        Ok(dump) => {
            let bytes: Vec<String> = dump_words(&dump)
                .into_iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("    code from RIP-1: {}\n", bytes.join(" "))
        }
        Err(_) => String::new(),
    }
}

/// The code addresses on a CPU's kernel stack, innermost first: a poor man's backtrace (it may
/// hold stale return addresses too, as the kernel's own unreliable frames do).
fn stack_scan(qmp: &Path, state: &CpuState, map: &SymbolMap, mods: &[Module]) -> String {
    if state.cpl == "3" || state.rsp == 0 {
        return String::new();
    }
    let Ok(dump) = hmp(qmp, &format!("x /160gx {:#x}", state.rsp), Some(state.cpu)) else {
        return String::new();
    };
    let names: Vec<String> = dump_words(&dump)
        .into_iter()
        .filter(|w| *w >= 0xffff_ffff_8000_0000)
        .map(|w| describe_rip(w, "0", map, mods))
        .filter(|n| !n.starts_with("not in"))
        .collect();
    if names.is_empty() {
        return String::new();
    }
    format!("    stack: {}\n", names.join(" < "))
}

/// A halted CPU's local APIC as QEMU has it (timer mode and counts, interrupts pending in IRR or
/// in service in ISR): a halted L1 that never wakes has either no timer armed or an interrupt
/// that is pending and never delivered, and this tells which.
fn lapic(qmp: &Path, state: &CpuState) -> String {
    match hmp(qmp, "info lapic", Some(state.cpu)) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("    lapic: {}\n", l.trim_end()))
            .collect(),
        Err(e) => format!("    lapic: cannot ask QEMU: {e}\n"),
    }
}

/// Where each L1 CPU is, sampled twice a second apart (a CPU whose RIP does not move is spinning in
/// one place), with the kernel function or module named.
pub fn cpu_report(qmp: &Path, map: &SymbolMap, kernel_log: &str) -> String {
    let mods = modules(kernel_log);
    let mut report = String::new();
    for sample in 0..2 {
        if sample > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match hmp(qmp, "info registers -a", None) {
            Ok(text) => {
                let states = cpu_states(&text);
                if states.is_empty() {
                    report.push_str(&format!("  (no registers in QEMU's answer: {text:?})\n"));
                }
                for st in states {
                    report.push_str(&format!(
                        "  sample {sample} cpu{}: RIP {:016x} CPL {}{} RFL {:08x} (IF {}){} -> {}\n",
                        st.cpu,
                        st.rip,
                        st.cpl,
                        if st.halted { " halted" } else { "" },
                        st.rflags,
                        st.rflags >> 9 & 1,
                        if st.inhibit { " in an interrupt shadow" } else { "" },
                        describe_rip(st.rip, &st.cpl, map, &mods)
                    ));
                    if sample == 0 {
                        report.push_str(&code_bytes(qmp, &st));
                        report.push_str(&stack_scan(qmp, &st, map, &mods));
                        if st.halted {
                            report.push_str(&lapic(qmp, &st));
                        }
                    }
                }
            }
            Err(e) => {
                report.push_str(&format!("  cannot ask QEMU: {e}\n"));
                break;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_noted_and_left_out_of_the_text() {
        let dir = std::env::temp_dir().join(format!("kiln-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l1.log");
        std::fs::write(&path, "").unwrap();
        let mut log = KernelLog::new(path.clone());
        log.poll();
        assert!(log.since_beat().is_none());
        std::fs::write(
            &path,
            "[ 1.0] hello\r\n@@KILN-LAB:BEAT@@\r\nkvm_amd 1000 0 - Live 0xffffffffc0000000\npart",
        )
        .unwrap();
        log.poll();
        assert!(log.since_beat().is_some());
        assert_eq!(
            log.text,
            "[ 1.0] hello\nkvm_amd 1000 0 - Live 0xffffffffc0000000\n"
        );
        assert_eq!(log.tail(1), "kvm_amd 1000 0 - Live 0xffffffffc0000000");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn addresses_are_named_by_kernel_symbol_or_module() {
        let log = "kvm_amd 4096 0 - Live 0xffffffffc0001000 (O)\nbad line\n";
        let saved = save_kallsyms(
            "ffffffff81000000 T _text\nffffffff81000100 t do_thing\nffffffff81000200 D data\n\
             ffffffffc0001008 t svm_vcpu_run\t[kvm_amd]\nffffffffc0009000 t gone\t[other]\n",
            log,
        );
        assert_eq!(
            saved,
            "K ffffffff81000000 _text\nK ffffffff81000100 do_thing\nM kvm_amd 8 svm_vcpu_run\n"
        );
        let map = SymbolMap::parse(&saved);
        let mods = modules(log);
        assert_eq!(
            describe_rip(0xffffffff81000104, "0", &map, &mods),
            "do_thing+0x4"
        );
        // On another boot the module sits elsewhere; its symbols follow it.
        let moved = modules("kvm_amd 4096 0 - Live 0xffffffffc0005000\n");
        assert_eq!(
            describe_rip(0xffffffffc000500c, "0", &map, &moved),
            "svm_vcpu_run+0x4 [kvm_amd]"
        );
        assert_eq!(describe_rip(0x401000, "3", &map, &mods), "user space");
        assert!(describe_rip(0x1000, "0", &map, &mods).starts_with("not in"));
    }

    #[test]
    fn registers_are_read_per_cpu() {
        let text = "CPU#0\nRAX=0 RBX=1\nRSI=0 RDI=0 RBP=0 RSP=ffffc90000013e58\nRIP=ffffffff81000104 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\nCPU#1\nRIP=0000000000401000 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=1\n";
        let states = cpu_states(text);
        assert_eq!(states.len(), 2);
        assert_eq!(
            (
                states[0].cpu,
                states[0].rip,
                states[0].cpl.as_str(),
                states[0].halted
            ),
            (0, 0xffffffff81000104, "0", false)
        );
        assert_eq!(
            (
                states[1].cpu,
                states[1].rip,
                states[1].cpl.as_str(),
                states[1].halted
            ),
            (1, 0x401000, "3", true)
        );
        assert_eq!((states[0].rflags, states[0].inhibit), (0x246, false));
        assert_eq!(states[1].rflags >> 9 & 1, 1, "IF");
        assert_eq!(
            dump_words("ffffc90000013e58: 0xffffffff81a04ffe 0x0000000000000000\n"),
            vec![0xffffffff81a04ffe, 0]
        );
    }
}
