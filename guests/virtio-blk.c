/* virtio-blk: finds the virtio-blk PCI function, sets up its request queue with MSI-X entry 0 ->
 * vector 0x51, then (one request at a time, each waited for in hlt until its interrupt): get-id,
 * read sector 0, write sector 1, flush, and a read past the end of the disk. See
 * guests/README.md for the protocol. */
#include <pyvmmfw.h>

#define VECTOR     0x51
#define QUEUE_SIZE 8
#define SECTOR     512

#define VIRTIO_BLK_T_IN     0
#define VIRTIO_BLK_T_OUT    1
#define VIRTIO_BLK_T_FLUSH  4
#define VIRTIO_BLK_T_GET_ID 8

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static uint8_t ring[VIRTQ_MEM_SIZE(QUEUE_SIZE)] __attribute__((aligned(4096)));
static uint8_t data[SECTOR];
/* Sector 0 is read into a page of its own that the guest itself never writes (crt0 zeroes it
 * before main), so the host can tell the device's write from the guest's in the dirty log. */
static uint8_t sector0[4096] __attribute__((aligned(4096)));
static struct blk_header header;
static volatile uint8_t status;
static volatile uint32_t irqs;
static struct virtq q;

static void on_irq(struct int_frame *f)
{
    (void)f;
    irqs++;
    lapic_eoi();
}

/* One request: header, then `len` bytes at `buf` (none if 0), then the status byte. Returns the
 * status, or -1 if the device returned something else. */
static int request_into(uint8_t *buf, uint32_t type, uint64_t sector, uint32_t len,
                        int device_writes)
{
    struct virtq_buf bufs[3];
    unsigned n = 0;

    header.type = type;
    header.sector = sector;
    status = 0xFF;
    bufs[n++] = (struct virtq_buf){ &header, sizeof(header), 0 };
    if (len)
        bufs[n++] = (struct virtq_buf){ buf, len, device_writes };
    bufs[n++] = (struct virtq_buf){ (const void *)&status, 1, 1 };

    uint32_t seen = irqs;
    uint16_t head = virtq_post(&q, bufs, n);
    virtq_kick(&q);
    cli();
    while (irqs == seen) {
        sti_hlt();
        cli();
    }
    sti();
    uint32_t used;
    if (virtq_get_used(&q, &used) != head)
        return -1;
    return status;
}

static int request(uint32_t type, uint64_t sector, uint32_t len, int device_writes)
{
    return request_into(data, type, sector, len, device_writes);
}

static int fail(const char *what)
{
    printf("virtio-blk: %s failed\n", what);
    return 1;
}

int main(void)
{
    struct virtio_dev d;

    idt_init();
    idt_register(VECTOR, on_irq);
    pic_disable(0x20, 0x28);
    lapic_enable();

    if (virtio_find(&d, VIRTIO_ID_BLOCK) < 0 || !d.msix_cap || !d.device)
        return fail("finding the device");
    const char *failed = virtio_start_one_queue(&d, &q, QUEUE_SIZE, ring, VECTOR);
    if (failed)
        return fail(failed);

    uint64_t capacity = mmio_read64(d.device);
    printf("virtio-blk: capacity %lu sectors\n", capacity);

    if (request(VIRTIO_BLK_T_GET_ID, 0, 20, 1) != 0)
        return fail("get-id");
    data[20] = 0;
    printf("virtio-blk: id %s\n", (const char *)data);

    fw_checkpoint(1);
    if (request_into(sector0, VIRTIO_BLK_T_IN, 0, SECTOR, 1) != 0)
        return fail("reading sector 0");
    fw_checkpoint(2);
    memcpy(data, sector0, 64);
    data[64] = 0;
    printf("virtio-blk: sector 0 %s\n", (const char *)data);

    for (unsigned i = 0; i < SECTOR; i++)
        data[i] = (uint8_t)(i * 7 + 3);
    if (request(VIRTIO_BLK_T_OUT, 1, SECTOR, 0) != 0)
        return fail("writing sector 1");
    if (request(VIRTIO_BLK_T_FLUSH, 0, 0, 0) != 0)
        return fail("flush");
    printf("virtio-blk: wrote sector 1\n");

    printf("virtio-blk: read past end status %d\n",
           request(VIRTIO_BLK_T_IN, capacity, SECTOR, 1));
    return 0;
}
