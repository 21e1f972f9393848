/* The C peer of the exits and start-up benchmarks: a minimal KVM VMM that boots a test guest
 * the way pyvmm does (long mode, identity-mapped 4 GiB, in-kernel irqchip and PIT) and handles
 * its port exits in a plain C loop: the bench port (reads give N, writes are counted), COM1's
 * transmitter (to stdout; its line status always "empty"), the debug-exit port (ends the run).
 * Usage: exits-peer GUEST.elf N; prints "writes=W seconds=S" on stderr. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE (64UL << 20)
#define BENCH_PORT 0x510
#define DEBUG_EXIT_PORT 0x501
#define COM1 0x3F8
#define UART_LSR 5
#define LSR_EMPTY 0x60 /* transmitter holding register and shift register empty */

static void die(const char *what)
{
    fprintf(stderr, "exits-peer: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void load_elf(const char *path, uint8_t *ram, uint64_t *entry)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    Elf64_Ehdr eh;
    if (fread(&eh, sizeof eh, 1, f) != 1)
        die("read ELF header");
    for (int i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        fseek(f, (long)(eh.e_phoff + (uint64_t)i * eh.e_phentsize), SEEK_SET);
        if (fread(&ph, sizeof ph, 1, f) != 1)
            die("read program header");
        if (ph.p_type != PT_LOAD)
            continue;
        if (ph.p_paddr + ph.p_memsz > RAM_SIZE) {
            fprintf(stderr, "exits-peer: segment outside RAM\n");
            exit(1);
        }
        memset(ram + ph.p_paddr, 0, ph.p_memsz);
        fseek(f, (long)ph.p_offset, SEEK_SET);
        if (ph.p_filesz && fread(ram + ph.p_paddr, ph.p_filesz, 1, f) != 1)
            die("read segment");
    }
    fclose(f);
    *entry = eh.e_entry;
}

static struct kvm_segment segment(uint16_t selector, uint8_t type, uint8_t l, uint8_t db)
{
    struct kvm_segment s = {.base = 0, .limit = 0xFFFFFFFF, .selector = selector, .type = type,
                            .present = 1, .s = 1, .l = l, .db = db, .g = 1};
    return s;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: exits-peer GUEST.elf N\n");
        return 2;
    }
    uint32_t n = (uint32_t)strtoul(argv[2], NULL, 0);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    int memfd = memfd_create("peer-ram", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, RAM_SIZE) < 0)
        die("memfd");
    uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (ram == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE, .userspace_addr = (uint64_t)ram};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    uint64_t idmap = 0xFFFBC000;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0 || ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000) < 0)
        die("TSS/identity map");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        die("KVM_CREATE_PIT2");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    struct {
        struct kvm_cpuid2 h;
        struct kvm_cpuid_entry2 e[256];
    } cpuid = {.h.nent = 256};
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0 || ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0)
        die("CPUID");
    long run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    uint64_t entry;
    load_elf(argv[1], ram, &entry);
    uint64_t *gdt = (uint64_t *)(ram + 0x500);
    gdt[0] = 0;
    gdt[1] = 0x00AF9B000000FFFFULL;
    gdt[2] = 0x00CF93000000FFFFULL;
    gdt[3] = 0x008F8B000000FFFFULL;
    uint64_t *pml4 = (uint64_t *)(ram + 0x9000), *pdpt = (uint64_t *)(ram + 0xA000);
    uint64_t *pd = (uint64_t *)(ram + 0xB000);
    pml4[0] = 0xA000 | 3;
    for (int i = 0; i < 4; i++)
        pdpt[i] = (0xB000 + 0x1000UL * (uint64_t)i) | 3;
    for (uint64_t i = 0; i < 2048; i++)
        pd[i] = (i << 21) | 0x83;

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs = segment(0x8, 11, 1, 0);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment(0x10, 3, 0, 1);
    sregs.tr = segment(0x18, 11, 0, 0);
    sregs.tr.s = 0;
    sregs.gdt.base = 0x500;
    sregs.gdt.limit = 31;
    sregs.cr3 = 0x9000;
    sregs.cr4 = 1 << 5;
    sregs.cr0 = 0x80050033;
    sregs.efer = (1 << 8) | (1 << 10);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = entry, .rflags = 2, .rdi = RAM_SIZE, .rsi = 1};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t writes = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "exits-peer: unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        int in = run->io.direction == KVM_EXIT_IO_IN;
        if (run->io.port == BENCH_PORT) {
            if (in)
                memcpy(data, &n, 4);
            else
                writes += run->io.count;
        } else if (run->io.port == DEBUG_EXIT_PORT) {
            break;
        } else if (run->io.port == COM1 && !in) {
            fwrite(data, 1, run->io.count, stdout);
        } else if (in) {
            memset(data, run->io.port == COM1 + UART_LSR ? LSR_EMPTY : 0xFF,
                   (size_t)run->io.size * run->io.count);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    fflush(stdout);
    fprintf(stderr, "writes=%llu seconds=%.6f\n", (unsigned long long)writes, seconds);
    return writes == n ? 0 : 1;
}
