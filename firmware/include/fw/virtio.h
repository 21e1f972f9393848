/* A minimal virtio 1.x driver over the modern PCI transport: find a device on bus 0, negotiate,
 * set up split virtqueues in guest memory, post buffers, notify, collect used buffers. Polling or
 * MSI-X; no legacy interface, no INTx. */
#ifndef FW_VIRTIO_H
#define FW_VIRTIO_H

#include <stdint.h>

#define VIRTIO_PCI_VENDOR      0x1AF4
#define VIRTIO_PCI_DEVICE_BASE 0x1040   /* + device type */
#define VIRTIO_ID_NET   1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG   4

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define VIRTIO_NO_VECTOR   0xFFFF

#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtio_dev {
    uint8_t bus, dev, fn;
    uint8_t msix_cap;                   /* 0: none */
    uintptr_t common, notify, isr, device;
    uint32_t notify_multiplier;
};

struct virtq {
    uint16_t size, index;
    uintptr_t doorbell;
    struct virtq_desc *desc;
    volatile uint16_t *avail;           /* flags, idx, ring[size] */
    volatile uint16_t *used_idx;
    volatile struct virtq_used_elem *used;
    uint16_t free_head, avail_idx, last_used;
};

/* Bytes of memory virtq_setup needs for a queue of `size` entries (4 KiB aligned). */
#define VIRTQ_MEM_SIZE(size) ((((16 * (size) + 6 + 2 * (size)) + 3) & ~3u) + 6 + 8 * (size))

/* Finds the first virtio-pci function of `type` on bus 0, turns on memory decode and bus
 * mastering, and maps its capabilities. Returns 0, or -1 if there is none or it is incomplete. */
int virtio_find(struct virtio_dev *d, uint16_t type);
/* Reset, ACKNOWLEDGE, DRIVER, then accept VERSION_1 plus the bits of `wanted` the device offers
 * and set FEATURES_OK. Returns 0, or -1 if the device refuses (or lacks VERSION_1). */
int virtio_negotiate(struct virtio_dev *d, uint64_t wanted);
/* Sets up queue `index` with `size` entries in `mem` (VIRTQ_MEM_SIZE(size) bytes, zeroed,
 * 4 KiB aligned), using MSI-X table entry `vector` (VIRTIO_NO_VECTOR: none), and enables it.
 * Returns 0, or -1 if the queue does not exist, is too small, or the vector was refused. */
int virtq_setup(struct virtio_dev *d, struct virtq *q, uint16_t index, uint16_t size, void *mem,
                uint16_t vector);
/* The usual bring-up of a one-queue device: negotiate (VERSION_1 only), route MSI-X entry 0 to
 * IDT vector `idt_vector` on this CPU, set up queue 0 in `mem` with that entry, set DRIVER_OK.
 * Returns NULL, or what failed ("feature negotiation", "queue set-up"). */
const char *virtio_start_one_queue(struct virtio_dev *d, struct virtq *q, uint16_t size, void *mem,
                                   uint8_t idt_vector);
/* Sets DRIVER_OK. */
void virtio_driver_ok(struct virtio_dev *d);
uint8_t virtio_status(struct virtio_dev *d);

struct virtq_buf {
    const void *addr;
    uint32_t len;
    int writable;                       /* device-writable; these must come last */
};
/* Posts a chain of n buffers and returns its head index (no notification yet). */
uint16_t virtq_post(struct virtq *q, const struct virtq_buf *bufs, unsigned n);
/* Tells the device about posted buffers (a 16-bit write of the queue index to its doorbell). */
void virtq_kick(struct virtq *q);
/* If the device returned a chain: stores its length, frees its descriptors and returns its
 * head; else -1. */
int virtq_get_used(struct virtq *q, uint32_t *len);

#endif
