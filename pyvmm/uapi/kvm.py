"""KVM uAPI (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) as of Linux 7.3.

Only what pyvmm uses, spelled exactly as the kernel spells it, so that `tests/test_abi.py` can check
every struct size, field offset and ioctl number against the headers with a compiled probe.

The objects: `/dev/kvm` (the system fd) creates VMs; a VM fd owns guest memory slots, the
in-kernel interrupt controllers, GSI routing, irqfds and ioeventfds, and creates vCPUs; a vCPU fd
runs the guest with KVM_RUN and shares a `struct kvm_run` page with userspace through mmap.
Untagged nested structs are given private names (leading underscore): C has no name for them.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64

from pyvmm.uapi.ioctl import _IO, _IOR, _IOW, _IOWR, register_names

KVM_API_VERSION = 12
KVMIO = 0xAE

KVM_NR_INTERRUPTS = 256
KVM_IOAPIC_NUM_PINS = 24
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_PIT_SPEAKER_DUMMY = 1

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_DEV_TYPE_VFIO = 4
KVM_DEV_VFIO_FILE = 1
KVM_DEV_VFIO_FILE_ADD = 1
KVM_DEV_VFIO_FILE_DEL = 2

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class KvmExit(enum.IntEnum):
    """kvm_run.exit_reason (KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37
    MEMORY_FAULT = 39


class KvmSystemEvent(enum.IntEnum):
    """kvm_run.system_event.type (KVM_SYSTEM_EVENT_*)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5


class KvmMpState(enum.IntEnum):
    """kvm_mp_state.mp_state (KVM_MP_STATE_*)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class KvmCap(enum.IntEnum):
    """KVM_CHECK_EXTENSION capabilities (KVM_CAP_*) that pyvmm asks about."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    SYNC_MMU = 16
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    PIT_STATE2 = 35
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SIGNAL_MSI = 77
    IRQFD_RESAMPLE = 82
    DEVICE_CTRL = 89
    MAX_VCPU_ID = 128
    SPLIT_IRQCHIP = 121
    IMMEDIATE_EXIT = 136
    EXCEPTION_PAYLOAD = 164
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    XSAVE2 = 208
    PRE_FAULT_MEMORY = 236


# Structures: arch/x86/include/uapi/asm/kvm.h


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """`entries[]` is a flexible array member: zero-length here, as it sets the alignment."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):
    """Header only; `indices[]` (__u32) follows it in memory."""

    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; `entries[]` (struct kvm_cpuid_entry2) follows it in memory."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class _kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class _kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_xsave(ctypes.Structure):
    """The legacy 4 KiB area; KVM_GET_XSAVE2 may use a larger buffer (KVM_CAP_XSAVE2)."""

    _fields_ = [("region", c_uint32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


# Structures: include/uapi/linux/kvm.h


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        ("last_irr", c_uint8),
        ("irr", c_uint8),
        ("imr", c_uint8),
        ("isr", c_uint8),
        ("priority_add", c_uint8),
        ("irq_base", c_uint8),
        ("read_reg_select", c_uint8),
        ("poll", c_uint8),
        ("special_mask", c_uint8),
        ("init_state", c_uint8),
        ("auto_eoi", c_uint8),
        ("rotate_on_auto_eoi", c_uint8),
        ("special_fully_nested_mode", c_uint8),
        ("init4", c_uint8),
        ("elcr", c_uint8),
        ("elcr_mask", c_uint8),
    ]


class _kvm_ioapic_redirtbl(ctypes.Union):
    """A redirection entry; pyvmm uses the raw 64 bits, not the bitfield view."""

    _fields_ = [("bits", c_uint64)]


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", _kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]


class _kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _kvm_irqchip_chip)]


class _kvm_irq_level_u(ctypes.Union):
    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class kvm_irq_level(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("_u", _kvm_irq_level_u), ("level", c_uint32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class _kvm_irq_routing_msi_u(ctypes.Union):
    _fields_ = [("pad", c_uint32), ("devid", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("_u", _kvm_irq_routing_msi_u),
    ]


class kvm_irq_routing_s390_adapter(ctypes.Structure):
    """Not used on x86, but part of the routing entry's union (and of its alignment)."""

    _fields_ = [
        ("ind_addr", c_uint64),
        ("summary_addr", c_uint64),
        ("ind_offset", c_uint64),
        ("summary_offset", c_uint32),
        ("adapter_id", c_uint32),
    ]


class _kvm_irq_routing_entry_u(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("adapter", kvm_irq_routing_s390_adapter),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing(ctypes.Structure):
    """`entries[]` is a flexible array member: zero-length here, as it sets the alignment."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * 0)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class _kvm_dirty_log_u(ctypes.Union):
    _fields_ = [("dirty_bitmap", ctypes.c_void_p), ("padding2", c_uint64)]


class kvm_dirty_log(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("_u", _kvm_dirty_log_u)]


class kvm_clear_dirty_log(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("_u", _kvm_dirty_log_u),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_pre_fault_memory(ctypes.Structure):
    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("padding", c_uint64 * 5),
    ]


class kvm_create_device(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("fd", c_uint32), ("flags", c_uint32)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("group", c_uint32),
        ("attr", c_uint64),
        ("addr", c_uint64),
    ]


class kvm_signal_mask(ctypes.Structure):
    """Header only; `sigset[]` follows it in memory."""

    _fields_ = [("len", c_uint32)]


# struct kvm_run and the parts of its exit union that pyvmm reads.


class _kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class _kvm_run_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class _kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        ("padding", c_char * 256),
    ]


class _kvm_run_s(ctypes.Union):
    """The sync-regs area (KVM_CAP_SYNC_REGS), unused by pyvmm."""

    _fields_ = [("padding", c_char * 2048)]


class kvm_run(ctypes.Structure):
    """The page KVM shares with userspace (struct kvm_run)."""

    _anonymous_ = ("_exit",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("_exit", _kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _kvm_run_s),
    ]


# ioctls on /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, kvm_msr_list)

# ioctls on a VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)
KVM_CREATE_DEVICE = _IOWR(KVMIO, 0xE0, kvm_create_device)
KVM_SET_DEVICE_ATTR = _IOW(KVMIO, 0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = _IOW(KVMIO, 0xE2, kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _IOW(KVMIO, 0xE3, kvm_device_attr)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)

# ioctls on VM or vCPU fds
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)

# ioctls on a vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, kvm_signal_mask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)
KVM_PRE_FAULT_MEMORY = _IOWR(KVMIO, 0xD5, kvm_pre_fault_memory)

C_PREFIX: dict[type, str] = {
    KvmExit: "KVM_EXIT_",
    KvmSystemEvent: "KVM_SYSTEM_EVENT_",
    KvmMpState: "KVM_MP_STATE_",
    KvmCap: "KVM_CAP_",
}

register_names(globals(), "KVM_", KVMIO)
