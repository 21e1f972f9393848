/* The vCPU exit path in C: enter KVM_RUN and decode the exit it returns.
 *
 * Built with cffi in API mode (pyvmm/kvm/exitloop_build.py) into pyvmm.kvm._exitloop; cffi
 * releases the GIL around every call, so a vCPU in the guest holds no Python lock. Python sees
 * only what a Python device must: one `struct pyvmm_exit` per exit, with the access decoded
 * (reason, port or address, size, direction, value), read from the kernel's `struct kvm_run`
 * by the kernel's own header. pyvmm.uapi.kvm (ctypes) stays the ABI's source of truth for
 * Python: pyvmm_exitloop_offsets() hands the offsets compiled in here to the ABI test.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

struct pyvmm_exit {
    uint32_t reason;      /* KVM_EXIT_*; KVM_EXIT_INTR for EINTR and EAGAIN */
    uint32_t size;        /* bytes per access (PIO: 1, 2, 4; MMIO: 1 to 8) */
    uint64_t where;       /* the port, or the guest-physical address */
    uint64_t value;       /* a write's value (PIO: the first item's) */
    uint32_t count;       /* PIO: items (more than one for rep ins/outs) */
    uint32_t data_offset; /* PIO: where the items are in the kvm_run page */
    uint32_t is_write;
    uint32_t pad;
};

static uint64_t load(const uint8_t *data, uint32_t size)
{
    uint64_t value = 0;
    memcpy(&value, data, size > 8 ? 8 : size); /* (x86: little-endian, as the guest wrote it) */
    return value;
}

/* KVM_RUN once and decode its exit into *exit. 0, or -errno for an error other than EINTR and
 * EAGAIN (those clear immediate_exit and report KVM_EXIT_INTR). */
int pyvmm_vcpu_run(int fd, void *page, struct pyvmm_exit *exit)
{
    struct kvm_run *run = page;
    if (ioctl(fd, KVM_RUN, 0) < 0) {
        if (errno != EINTR && errno != EAGAIN)
            return -errno;
        run->immediate_exit = 0;
        exit->reason = KVM_EXIT_INTR;
        return 0;
    }
    exit->reason = run->exit_reason;
    if (run->exit_reason == KVM_EXIT_IO) {
        exit->where = run->io.port;
        exit->size = run->io.size;
        exit->count = run->io.count;
        exit->data_offset = (uint32_t)run->io.data_offset;
        exit->is_write = run->io.direction == KVM_EXIT_IO_OUT;
        if (exit->is_write)
            exit->value = load((const uint8_t *)run + run->io.data_offset, run->io.size);
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        exit->where = run->mmio.phys_addr;
        exit->size = run->mmio.len;
        exit->count = 1;
        exit->is_write = run->mmio.is_write;
        if (exit->is_write)
            exit->value = load(run->mmio.data, run->mmio.len);
    }
    return 0;
}

/* Answer the read the last exit asked for (a single PIO in, or an MMIO read): `value`'s low
 * `size` bytes become the data KVM hands the guest when it next enters KVM_RUN. */
void pyvmm_complete_read(void *page, const struct pyvmm_exit *exit, uint64_t value)
{
    struct kvm_run *run = page;
    uint8_t *data = run->exit_reason == KVM_EXIT_IO ? (uint8_t *)run + run->io.data_offset
                                                    : run->mmio.data;
    memcpy(data, &value, exit->size > 8 ? 8 : exit->size);
}

/* The kvm_run offsets this file was compiled with, for the ABI test to compare with pyvmm.uapi:
 * exit_reason, immediate_exit, io.direction, io.size, io.port, io.count, io.data_offset,
 * mmio.phys_addr, mmio.data, mmio.len, mmio.is_write. */
void pyvmm_exitloop_offsets(uint32_t offsets[11])
{
    offsets[0] = offsetof(struct kvm_run, exit_reason);
    offsets[1] = offsetof(struct kvm_run, immediate_exit);
    offsets[2] = offsetof(struct kvm_run, io.direction);
    offsets[3] = offsetof(struct kvm_run, io.size);
    offsets[4] = offsetof(struct kvm_run, io.port);
    offsets[5] = offsetof(struct kvm_run, io.count);
    offsets[6] = offsetof(struct kvm_run, io.data_offset);
    offsets[7] = offsetof(struct kvm_run, mmio.phys_addr);
    offsets[8] = offsetof(struct kvm_run, mmio.data);
    offsets[9] = offsetof(struct kvm_run, mmio.len);
    offsets[10] = offsetof(struct kvm_run, mmio.is_write);
}
