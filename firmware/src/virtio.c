#include <pyvmmfw.h>

/* struct virtio_pci_common_cfg offsets */
#define COMMON_DFSELECT     0x00
#define COMMON_DF           0x04
#define COMMON_GFSELECT     0x08
#define COMMON_GF           0x0C
#define COMMON_STATUS       0x14
#define COMMON_Q_SELECT     0x16
#define COMMON_Q_SIZE       0x18
#define COMMON_Q_MSIX       0x1A
#define COMMON_Q_ENABLE     0x1C
#define COMMON_Q_NOFF       0x1E
#define COMMON_Q_DESC       0x20
#define COMMON_Q_DRIVER     0x28
#define COMMON_Q_DEVICE     0x30

/* struct virtio_pci_cap: cfg_type at +3, bar at +4, offset at +8; notify multiplier at +16. */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR    3
#define CAP_DEVICE 4

int virtio_find(struct virtio_dev *d, uint16_t type)
{
    uint8_t dev;
    for (dev = 0; dev < 32; dev++) {
        uint32_t id = pci_read32(0, dev, 0, PCI_VENDOR_ID);
        if (id == (VIRTIO_PCI_VENDOR | (uint32_t)(VIRTIO_PCI_DEVICE_BASE + type) << 16))
            break;
    }
    if (dev == 32)
        return -1;
    memset(d, 0, sizeof(*d));
    d->dev = dev;
    uint16_t cmd = pci_read16(0, dev, 0, PCI_COMMAND);
    pci_write16(0, dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);

    for (uint8_t cap = 0; (cap = pci_find_cap(0, dev, 0, PCI_CAP_ID_VNDR, cap));) {
        uint8_t kind = pci_read8(0, dev, 0, cap + 3);
        uintptr_t addr = pci_bar_address(0, dev, 0, pci_read8(0, dev, 0, cap + 4))
                         + pci_read32(0, dev, 0, cap + 8);
        if (kind == CAP_COMMON && !d->common)
            d->common = addr;
        else if (kind == CAP_NOTIFY && !d->notify) {
            d->notify = addr;
            d->notify_multiplier = pci_read32(0, dev, 0, cap + 16);
        } else if (kind == CAP_ISR && !d->isr)
            d->isr = addr;
        else if (kind == CAP_DEVICE && !d->device)
            d->device = addr;
    }
    d->msix_cap = pci_find_cap(0, dev, 0, PCI_CAP_ID_MSIX, 0);
    return d->common && d->notify ? 0 : -1;
}

uint8_t virtio_status(struct virtio_dev *d)
{
    return mmio_read8(d->common + COMMON_STATUS);
}

static void set_status(struct virtio_dev *d, uint8_t bits)
{
    mmio_write8(d->common + COMMON_STATUS, virtio_status(d) | bits);
}

int virtio_negotiate(struct virtio_dev *d, uint64_t wanted)
{
    mmio_write8(d->common + COMMON_STATUS, 0);
    while (virtio_status(d) != 0)
        ;
    set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(d, VIRTIO_STATUS_DRIVER);
    uint64_t offered = 0;
    for (uint32_t sel = 0; sel < 2; sel++) {
        mmio_write32(d->common + COMMON_DFSELECT, sel);
        offered |= (uint64_t)mmio_read32(d->common + COMMON_DF) << (32 * sel);
    }
    if (!(offered & VIRTIO_F_VERSION_1))
        return -1;
    uint64_t accept = (wanted & offered) | VIRTIO_F_VERSION_1;
    for (uint32_t sel = 0; sel < 2; sel++) {
        mmio_write32(d->common + COMMON_GFSELECT, sel);
        mmio_write32(d->common + COMMON_GF, (uint32_t)(accept >> (32 * sel)));
    }
    set_status(d, VIRTIO_STATUS_FEATURES_OK);
    return (virtio_status(d) & VIRTIO_STATUS_FEATURES_OK) ? 0 : -1;
}

int virtq_setup(struct virtio_dev *d, struct virtq *q, uint16_t index, uint16_t size, void *mem,
                uint16_t vector)
{
    uintptr_t c = d->common;
    mmio_write16(c + COMMON_Q_SELECT, index);
    uint16_t max = mmio_read16(c + COMMON_Q_SIZE);
    if (max == 0 || size > max)
        return -1;
    mmio_write16(c + COMMON_Q_SIZE, size);
    mmio_write16(c + COMMON_Q_MSIX, vector);
    if (mmio_read16(c + COMMON_Q_MSIX) != vector)
        return -1;

    uintptr_t base = (uintptr_t)mem;
    uintptr_t used = (base + 16 * size + 6 + 2 * size + 3) & ~(uintptr_t)3;
    memset(q, 0, sizeof(*q));
    q->size = size;
    q->index = index;
    q->desc = (struct virtq_desc *)base;
    q->avail = (volatile uint16_t *)(base + 16 * size);
    q->used_idx = (volatile uint16_t *)(used + 2);
    q->used = (volatile struct virtq_used_elem *)(used + 4);
    for (uint16_t i = 0; i + 1 < size; i++)
        q->desc[i].next = i + 1;        /* the free list */
    q->doorbell = d->notify + d->notify_multiplier * mmio_read16(c + COMMON_Q_NOFF);

    mmio_write64(c + COMMON_Q_DESC, base);
    mmio_write64(c + COMMON_Q_DRIVER, (uintptr_t)q->avail);
    mmio_write64(c + COMMON_Q_DEVICE, used);
    mmio_write16(c + COMMON_Q_ENABLE, 1);
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

uint16_t virtq_post(struct virtq *q, const struct virtq_buf *bufs, unsigned n)
{
    uint16_t head = q->free_head, i = head;
    for (unsigned k = 0; k < n; k++) {
        struct virtq_desc *desc = &q->desc[i];
        desc->addr = (uintptr_t)bufs[k].addr;
        desc->len = bufs[k].len;
        desc->flags = (bufs[k].writable ? VIRTQ_DESC_F_WRITE : 0)
                      | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
        if (k + 1 < n)
            i = desc->next;
    }
    q->free_head = q->desc[i].next;
    q->avail[2 + q->avail_idx % q->size] = head;
    barrier();                          /* ring entry before the index (x86 keeps store order) */
    q->avail[1] = ++q->avail_idx;
    return head;
}

void virtq_kick(struct virtq *q)
{
    /* The avail index store is visible to the device before it sees the doorbell: the doorbell
     * write traps to the hypervisor, which signals the device through locked operations. */
    barrier();
    mmio_write16(q->doorbell, q->index);
}

int virtq_get_used(struct virtq *q, uint32_t *len)
{
    if (*q->used_idx == q->last_used)
        return -1;
    barrier();
    volatile struct virtq_used_elem *e = &q->used[q->last_used % q->size];
    uint16_t head = (uint16_t)e->id;
    *len = e->len;
    q->last_used++;
    /* Put the chain back on the free list. */
    uint16_t i = head;
    while (q->desc[i].flags & VIRTQ_DESC_F_NEXT)
        i = q->desc[i].next;
    q->desc[i].next = q->free_head;
    q->free_head = head;
    return head;
}

const char *virtio_start_one_queue(struct virtio_dev *d, struct virtq *q, uint16_t size, void *mem,
                                   uint8_t idt_vector)
{
    if (virtio_negotiate(d, 0) < 0)
        return "feature negotiation";
    msix_set_vector(pci_msix_table(0, d->dev, 0, d->msix_cap), 0, (uint8_t)lapic_id(), idt_vector);
    pci_msix_enable(0, d->dev, 0, d->msix_cap);
    if (virtq_setup(d, q, 0, size, mem, 0) < 0)
        return "queue set-up";
    virtio_driver_ok(d);
    return 0;
}
