/* virtio-rng: finds the virtio-rng PCI function, negotiates VERSION_1, sets up its request queue
 * with MSI-X entry 0 -> vector 0x50, posts one 16-byte buffer, notifies, halts until the
 * interrupt, and prints what the device wrote. See guests/README.md for the protocol. */
#include <pyvmmfw.h>

#define VECTOR     0x50
#define QUEUE_SIZE 8
#define REQUEST    16

static uint8_t ring[VIRTQ_MEM_SIZE(QUEUE_SIZE)] __attribute__((aligned(4096)));
static uint8_t entropy[REQUEST];
static volatile uint32_t irqs;

static void on_irq(struct int_frame *f)
{
    (void)f;
    irqs++;
    lapic_eoi();
}

static int fail(const char *what)
{
    printf("virtio-rng: %s failed\n", what);
    return 1;
}

int main(void)
{
    struct virtio_dev d;
    struct virtq q;

    idt_init();
    idt_register(VECTOR, on_irq);
    pic_disable(0x20, 0x28);
    lapic_enable();

    if (virtio_find(&d, VIRTIO_ID_RNG) < 0 || !d.msix_cap)
        return fail("finding the device");
    const char *failed = virtio_start_one_queue(&d, &q, QUEUE_SIZE, ring, VECTOR);
    if (failed)
        return fail(failed);

    struct virtq_buf buf = { entropy, REQUEST, 1 };
    uint16_t head = virtq_post(&q, &buf, 1);
    virtq_kick(&q);

    cli();
    while (irqs == 0) {
        sti_hlt();
        cli();
    }
    sti();

    uint32_t len;
    if (virtq_get_used(&q, &len) != head || len > REQUEST)
        return fail("collecting the buffer");
    printf("virtio-rng: %u bytes ", len);
    for (uint32_t i = 0; i < len; i++)
        printf("%02x", entropy[i]);
    printf("\n");
    return 0;
}
