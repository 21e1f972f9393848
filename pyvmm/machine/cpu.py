"""vCPU set-up: CPUID from KVM's supported list, and the 64-bit long-mode entry state
(GDT, identity-mapped page tables, control registers) that ELF guests and Linux start in."""

from __future__ import annotations

import contextlib
import struct

from pyvmm.kvm.errors import KvmUnavailable
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.machine import layout
from pyvmm.machine.memory import GuestMemory
from pyvmm.uapi import kvm as uapi

# GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
GDT_ENTRIES = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18

X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_AM = 1 << 18
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_HUGE = 1 << 7

CPUID_HYPERVISOR_BIT = 1 << 31

MSR_IA32_TSC = 0x10


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
CPUID_HT_BIT = 1 << 28
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2


def _topology_leaf(function: int, vcpu_id: int, vcpus: int) -> list[uapi.kvm_cpuid_entry2]:
    """Leaf 0xB / 0x1F: one thread per core, `vcpus` cores in one package."""
    core_shift = max(vcpus - 1, 0).bit_length()
    levels = (
        (0, 1, TOPOLOGY_LEVEL_SMT),  # (x2APIC id shift, logical CPUs at this level, type)
        (core_shift, vcpus, TOPOLOGY_LEVEL_CORE),
    )
    entries = []
    for index, (shift, count, level) in enumerate((*levels, (0, 0, 0))):
        entries.append(
            uapi.kvm_cpuid_entry2(
                function=function,
                index=index,
                flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax=shift,
                ebx=count,
                ecx=(level << 8) | index,
                edx=vcpu_id,
            )
        )
    return entries


def guest_cpuid(
    supported: list[uapi.kvm_cpuid_entry2], vcpu_id: int, vcpus: int
) -> list[uapi.kvm_cpuid_entry2]:
    """KVM's supported CPUID made consistent for one vCPU of a `vcpus`-core, one-thread-per-core
    package: its APIC id, core counts in leaves 1, 4, 0xB and 0x1F (Linux warns when they
    disagree), and the hypervisor bit so the guest knows it is virtualised."""
    entries = []
    for source in supported:
        entry = uapi.kvm_cpuid_entry2.from_buffer_copy(source)
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(vcpus, 255) << 16)
            entry.ecx |= CPUID_HYPERVISOR_BIT
            if vcpus > 1:
                entry.edx |= CPUID_HT_BIT
            else:
                entry.edx &= ~CPUID_HT_BIT
        elif entry.function == 4 and entry.eax & 0x1F:
            cache_level = (entry.eax >> 5) & 0x7
            sharing = vcpus - 1 if cache_level == 3 else 0
            entry.eax = (entry.eax & 0x3FFF) | (sharing << 14) | (min(vcpus - 1, 63) << 26)
        elif entry.function in (0xB, 0x1F):
            if entry.index == 0:
                entries.extend(_topology_leaf(entry.function, vcpu_id, vcpus))
            continue
        entries.append(entry)
    return entries


def check_tsc_counts(vcpu: Vcpu) -> None:
    """KvmUnavailable if KVM's view of this new vCPU's TSC stands still.

    KVM gives a new vCPU the TSC rate it measured when it loaded. On a CPU without a constant
    TSC (no invtsc: QEMU's TCG, so the lab's own KVM) the host kernel refines its TSC
    calibration a few seconds after boot, possibly after KVM loaded. When that rate ends up
    more than 250 ppm below the refined one and the CPU cannot scale TSCs, KVM prints "user
    requested TSC rate below hardware speed" and leaves the vCPU's TSC scaling ratio at 0:
    every guest TSC KVM computes (the TSC MSR, the TSC-deadline timer) is then a constant, and
    a Linux guest's timers never fire: it hangs at its first idle. Two reads of the TSC MSR,
    microseconds apart, tell."""
    first = vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC)
    second = vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC)
    if first is not None and first == second:
        khz = "an unknown rate"
        with contextlib.suppress(OSError):
            khz = f"{vcpu.get_tsc_khz()} kHz"
        raise KvmUnavailable(
            f"this KVM froze vCPU {vcpu.id}'s TSC (the host kernel's log says 'kvm: user "
            f"requested TSC rate below hardware speed'): it measured {khz} "
            "when it loaded, the host's TSC calibration moved since, and it cannot scale TSCs, "
            "so the guest's timers would never fire; boot the host with tsc_early_khz=<its TSC "
            "rate in kHz> or on a CPU with an invariant TSC"
        )


def phys_bits(supported: list[uapi.kvm_cpuid_entry2]) -> int:
    """The guest's physical address width (CPUID 0x80000008 EAX[7:0]; 36 when absent, as the
    SDM says for processors without the leaf)."""
    leaf = next((e for e in supported if e.function == 0x80000008), None)
    return (leaf.eax & 0xFF) if leaf is not None and leaf.eax & 0xFF else 36


def write_boot_tables(memory: GuestMemory) -> None:
    """The GDT and the page tables identity-mapping the first 4 GiB with 2 MiB pages."""
    memory.write(layout.BOOT_GDT, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    memory.write(layout.BOOT_IDT, bytes(8))
    memory.write(layout.PML4_START, struct.pack("<Q", layout.PDPTE_START | PTE_PRESENT | PTE_WRITE))
    pdptes = [(layout.PDE_START + i * 0x1000) | PTE_PRESENT | PTE_WRITE for i in range(4)]
    memory.write(layout.PDPTE_START, struct.pack("<4Q", *pdptes))
    pdes = [(i << 21) | PTE_PRESENT | PTE_WRITE | PTE_HUGE for i in range(4 * 512)]
    memory.write(layout.PDE_START, struct.pack(f"<{len(pdes)}Q", *pdes))


def segment_from_descriptor(selector: int, gdt_entry: int) -> uapi.kvm_segment:
    """A kvm_segment decoded from a GDT descriptor, as the CPU would load it."""
    seg = uapi.kvm_segment()
    seg.selector = selector
    seg.base = ((gdt_entry >> 16) & 0xFFFFFF) | (((gdt_entry >> 56) & 0xFF) << 24)
    limit = (gdt_entry & 0xFFFF) | (((gdt_entry >> 48) & 0xF) << 16)
    seg.g = (gdt_entry >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.type = (gdt_entry >> 40) & 0xF
    seg.s = (gdt_entry >> 44) & 1
    seg.dpl = (gdt_entry >> 45) & 3
    seg.present = (gdt_entry >> 47) & 1
    seg.avl = (gdt_entry >> 52) & 1
    seg.l = (gdt_entry >> 53) & 1
    seg.db = (gdt_entry >> 54) & 1
    return seg


def enter_long_mode(vcpu: Vcpu, entry: int, *, rdi: int = 0, rsi: int = 0) -> None:
    """Point a vCPU at `entry` in 64-bit mode on the boot GDT and page tables."""
    sregs = vcpu.get_sregs()
    code = segment_from_descriptor(CODE_SELECTOR, GDT_ENTRIES[1])
    data = segment_from_descriptor(DATA_SELECTOR, GDT_ENTRIES[2])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_descriptor(TSS_SELECTOR, GDT_ENTRIES[3])
    sregs.gdt.base = layout.BOOT_GDT
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = layout.BOOT_IDT
    sregs.idt.limit = 0
    sregs.cr3 = layout.PML4_START
    sregs.cr4 = X86_CR4_PAE
    sregs.cr0 = (
        X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM | X86_CR0_PG
    )
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = uapi.kvm_regs()
    regs.rip = entry
    regs.rflags = 0x2
    regs.rdi = rdi
    regs.rsi = rsi
    vcpu.set_regs(regs)

    fpu = uapi.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6


def set_boot_msrs(vcpu: Vcpu) -> None:
    """What firmware leaves behind for an OS: fast strings on, MTRRs on with write-back as the
    default memory type (otherwise Linux would treat all RAM as uncached)."""
    vcpu.set_msrs(
        {
            MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
            MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
        }
    )
