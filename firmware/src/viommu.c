/* The virtio-iommu driver: see fw/viommu.h. */
#include <pyvmmfw.h>
#include <fw/viommu.h>

#define T_ATTACH 1
#define T_DETACH 2
#define T_MAP    3
#define T_UNMAP  4

#define CONFIG_BYPASS 36   /* struct virtio_iommu_config: the bypass byte */
#define ANSWER_TICKS 500   /* 5 s at a 10 ms tick: a request is answered well within */

struct req_head {
    uint8_t type;
    uint8_t reserved[3];
} __attribute__((packed));

struct req_attach {
    struct req_head head;
    uint32_t domain, endpoint, flags;
    uint8_t reserved[4];
} __attribute__((packed));

struct req_detach {
    struct req_head head;
    uint32_t domain, endpoint;
    uint8_t reserved[8];
} __attribute__((packed));

struct req_map {
    struct req_head head;
    uint32_t domain;
    uint64_t virt_start, virt_end, phys_start;
    uint32_t flags;
} __attribute__((packed));

struct req_unmap {
    struct req_head head;
    uint32_t domain;
    uint64_t virt_start, virt_end;
    uint8_t reserved[4];
} __attribute__((packed));

static uint8_t tail[4];

const char *viommu_init(struct viommu *v)
{
    if (virtio_find(&v->d, VIRTIO_ID_IOMMU) < 0)
        return "finding the device";
    if (virtio_negotiate(&v->d, VIRTIO_IOMMU_F_BYPASS_CONFIG) < 0)
        return "feature negotiation";
    memset(v->ring, 0, sizeof(v->ring));
    if (virtq_setup(&v->d, &v->req, 0, VIOMMU_QUEUE_SIZE, v->ring, VIRTIO_NO_VECTOR) < 0)
        return "queue set-up";
    virtio_driver_ok(&v->d);
    return NULL;
}

void viommu_set_bypass(struct viommu *v, int on)
{
    mmio_write8(v->d.device + CONFIG_BYPASS, on ? 1 : 0);
}

/* Posts the request and its tail, notifies, and waits for the device to give them back. */
static int request(struct viommu *v, const void *req, uint32_t len)
{
    struct virtq_buf bufs[2] = { { req, len, 0 }, { tail, sizeof(tail), 1 } };
    tail[0] = 0xFF;
    uint16_t head = virtq_post(&v->req, bufs, 2);
    virtq_kick(&v->req);
    uint32_t start = lapic_ticks, used_len;
    int got;
    while ((got = virtq_get_used(&v->req, &used_len)) < 0) {
        if (lapic_ticks - start >= ANSWER_TICKS)
            return VIOMMU_TIMEOUT;
        sti_hlt();
        cli();
    }
    return got == head ? ((volatile uint8_t *)tail)[0] : VIOMMU_TIMEOUT;
}

int viommu_attach(struct viommu *v, uint32_t domain, uint32_t endpoint)
{
    struct req_attach r = { { T_ATTACH, { 0 } }, domain, endpoint, 0, { 0 } };
    return request(v, &r, sizeof(r));
}

int viommu_detach(struct viommu *v, uint32_t domain, uint32_t endpoint)
{
    struct req_detach r = { { T_DETACH, { 0 } }, domain, endpoint, { 0 } };
    return request(v, &r, sizeof(r));
}

int viommu_map(struct viommu *v, uint32_t domain, uint64_t iova, uint64_t gpa, uint64_t size,
               uint32_t flags)
{
    struct req_map r = { { T_MAP, { 0 } }, domain, iova, iova + size - 1, gpa, flags };
    return request(v, &r, sizeof(r));
}

int viommu_unmap(struct viommu *v, uint32_t domain, uint64_t iova, uint64_t size)
{
    struct req_unmap r = { { T_UNMAP, { 0 } }, domain, iova, iova + size - 1, { 0 } };
    return request(v, &r, sizeof(r));
}
