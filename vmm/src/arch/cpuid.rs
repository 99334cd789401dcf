//! CPUID for a guest vCPU: KVM's supported set, filtered so the guest sees a plausible machine: one
//! socket of `vcpu_count` vCPUs (single-thread cores, or with `smt` two threads a core, as
//! Firecracker's `machine-config.smt` asks), this vCPU's APIC id, the hypervisor bit, no PMU.
//! vCPU `n` has APIC id `n`, so with SMT vCPUs 2k and 2k+1 are the two threads of core k.

use kvm_bindings::kvm_cpuid_entry2;

/// `flags` bit: the leaf's value depends on the sub-leaf index.
const SIGNIFICANT_INDEX: u32 = 1;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: the package has more than one logical processor.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 EBX[15:8]: CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE: u32 = 8;
/// Leaf 0xB level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` cores (ceil(log2(n))).
fn id_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Host facts that change what the guest may be told.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCaps {
    /// KVM emulates the LAPIC's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`). KVM leaves the bit
    /// out of its supported CPUID because it is emulated; a guest that does not see it calibrates
    /// its LAPIC timer against the PIT at boot, which costs a tenth of a second.
    pub tsc_deadline_timer: bool,
}

/// Filters KVM's supported CPUID `entries` for vCPU `vcpu_id` of `vcpu_count`, with two threads
/// a core when `smt` is set and there is more than one vCPU (validation has made the count even).
pub fn filter(
    entries: &[kvm_cpuid_entry2],
    host: HostCaps,
    vcpu_id: u8,
    vcpu_count: u8,
    smt: bool,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(vcpu_id);
    let count = u32::from(vcpu_count.max(1));
    let threads: u32 = if smt && count > 1 { 2 } else { 1 };
    let cores = (count / threads).max(1);
    let thread_bits = id_bits(threads as u8);
    // Bits of the APIC id that number the logical processors of the package.
    let package_bits = thread_bits + id_bits(cores as u8);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(entries.len() + 4);
    for e in entries {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_LINE << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline_timer {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1
                // (L1 and L2 are a core's, shared by its threads; L3 is the package's).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { threads - 1 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((cores - 1) << 26);
            }
            // No PMU: guest perf counters would only add exits and host-dependence.
            LEAF_PMU => e.eax = 0,
            // Rebuilt below from scratch; 0x1F is dropped so Linux reads the 0xB we build.
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => continue,
            LEAF_AMD_SIZES => {
                // ECX[15:12]: APIC id bits for the package's logical processors; ECX[7:0]: their
                // number - 1.
                e.ecx = (e.ecx & !0xf0ff) | (package_bits << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC => {
                e.eax = apic_id;
                // EBX[15:8]: threads per core - 1; EBX[7:0]: this thread's core.
                e.ebx = ((threads - 1) << 8) | ((apic_id >> thread_bits) & 0xff);
                e.ecx &= !0x700; // one node per processor
            }
            _ => {}
        }
        out.push(e);
    }
    // Leaf 0xB: the SMT level (a core's threads), the core level (all vCPUs), then the
    // terminating invalid level. EAX: how far to shift the APIC id to number the next level up.
    out.push(entry(
        LEAF_EXT_TOPOLOGY,
        0,
        thread_bits,
        threads,
        LEVEL_SMT << 8,
        apic_id,
    ));
    out.push(entry(
        LEAF_EXT_TOPOLOGY,
        1,
        package_bits,
        count,
        (LEVEL_CORE << 8) | 1,
        apic_id,
    ));
    out.push(entry(LEAF_EXT_TOPOLOGY, 2, 0, 0, 2, apic_id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x800f12,
                ebx: 0xff_10_08_00,
                ecx: 0x7ed8_320b,
                edx: 0x178b_fbff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                flags: 1,
                eax: 0x3c00_0163,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: 0x0704_3004,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: 1,
                eax: 1,
                ebx: 2,
                ecx: 0x100,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1f,
                index: 0,
                flags: 1,
                eax: 1,
                ebx: 2,
                ecx: 0x100,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                ecx: 0x700f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x01ff_ffff,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let out = filter(&host(), HostCaps::default(), 3, 4, false);
        let l1 = leaf(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH line");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = leaf(&filter(&host(), HostCaps::default(), 0, 1, false), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
        assert_eq!(single.eax, 0x800f12, "family/model untouched");
    }

    #[test]
    fn topology_leaf_0xb_describes_one_socket_of_single_thread_cores() {
        let out = filter(&host(), HostCaps::default(), 5, 6, false);
        let smt = leaf(&out, 0xb, 0);
        let core = leaf(&out, 0xb, 1);
        let end = leaf(&out, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff, end.edx), (0, 0, 5));
        assert_eq!(
            out.iter().filter(|e| e.function == 0xb).count(),
            3,
            "host's 0xB replaced"
        );
        assert!(out.iter().all(|e| e.function != 0x1f), "0x1F dropped");
    }

    #[test]
    fn cache_amd_size_and_pmu_leaves_follow_the_vcpu_count() {
        let out = filter(&host(), HostCaps::default(), 0, 2, false);
        let l3 = leaf(&out, 4, 3);
        assert_eq!(l3.eax >> 26, 1, "cores per package - 1");
        assert_eq!((l3.eax >> 14) & 0xfff, 1, "L3 shared by both");
        assert_eq!(l3.eax & 0x3fff, 0x163 & 0x3fff, "cache type and level kept");
        assert_eq!(leaf(&out, 0xa, 0).eax, 0);
        let amd = leaf(&out, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 1);
        assert_eq!((amd.ecx >> 12) & 0xf, 1);
        assert_eq!(
            leaf(&out, 0x4000_0001, 0).eax,
            0x01ff_ffff,
            "KVM leaves kept"
        );
    }

    #[test]
    fn tsc_deadline_is_offered_only_when_kvm_emulates_it() {
        let off = leaf(&filter(&host(), HostCaps::default(), 0, 1, false), 1, 0);
        assert_eq!(off.ecx & ECX_TSC_DEADLINE, 0);
        let on = leaf(
            &filter(
                &host(),
                HostCaps {
                    tsc_deadline_timer: true,
                },
                0,
                1,
                false,
            ),
            1,
            0,
        );
        assert_ne!(on.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn with_smt_vcpus_pair_up_as_the_two_threads_of_a_core() {
        // vCPU 5 of 6: thread 1 of core 2 (APIC id 5 = core 2 << 1 | 1).
        let out = filter(&host(), HostCaps::default(), 5, 6, true);
        let smt = leaf(&out, 0xb, 0);
        let core = leaf(&out, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, 5));
        // 1 thread bit + 2 bits for 3 cores.
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let l1 = leaf(&out, 1, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 6, "logical processors");
        assert_ne!(l1.edx & EDX_HTT, 0);
        let l3 = leaf(&out, 4, 3);
        assert_eq!(l3.eax >> 26, 2, "3 cores");
        assert_eq!((l3.eax >> 14) & 0xfff, 5, "L3 shared by all 6");
        let amd = leaf(&out, 0x8000_0008, 0);
        assert_eq!((amd.ecx & 0xff, (amd.ecx >> 12) & 0xf), (5, 3));
        // A host L1 cache leaf is shared by the core's two threads.
        let mut with_l1 = host();
        with_l1.push(kvm_cpuid_entry2 {
            function: 4,
            index: 0,
            flags: 1,
            eax: 0x0000_0121,
            ..Default::default()
        });
        with_l1.push(kvm_cpuid_entry2 {
            function: 0x8000_001e,
            ..Default::default()
        });
        let out = filter(&with_l1, HostCaps::default(), 5, 6, true);
        assert_eq!((leaf(&out, 4, 0).eax >> 14) & 0xfff, 1);
        let ext = leaf(&out, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx), (5, 0x102), "thread pair, core 2");
        let out = filter(&with_l1, HostCaps::default(), 5, 6, false);
        assert_eq!((leaf(&out, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!(leaf(&out, 0x8000_001e, 0).ebx, 5, "one thread a core");
        // One vCPU has no sibling, SMT or not.
        let one = filter(&host(), HostCaps::default(), 0, 1, true);
        assert_eq!((leaf(&one, 0xb, 0).eax, leaf(&one, 0xb, 0).ebx), (0, 1));
    }

    #[test]
    fn id_bits_round_up() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
