/* A minimal virtio-iommu driver (virtio 1.2 §5.13): its request queue, polled; ATTACH, DETACH,
 * MAP and UNMAP, each answered before the call returns; the configuration's bypass bit. Waits are
 * bounded by the LAPIC tick (lapic_tick_start first). */
#ifndef FW_VIOMMU_H
#define FW_VIOMMU_H

#include <stdint.h>
#include <fw/virtio.h>

#define VIRTIO_ID_IOMMU 23
#define VIRTIO_IOMMU_F_BYPASS_CONFIG (1ULL << 6)

#define VIOMMU_MAP_READ  1
#define VIOMMU_MAP_WRITE 2

/* Request statuses (the tail's first byte); VIOMMU_TIMEOUT: no answer in time. */
#define VIOMMU_S_OK     0
#define VIOMMU_S_INVAL  4
#define VIOMMU_S_RANGE  5
#define VIOMMU_S_NOENT  6
#define VIOMMU_TIMEOUT  -1

#define VIOMMU_QUEUE_SIZE 8

struct viommu {
    struct virtio_dev d;
    struct virtq req;
    uint8_t ring[VIRTQ_MEM_SIZE(VIOMMU_QUEUE_SIZE)] __attribute__((aligned(4096)));
};

/* Finds the virtio-iommu on bus 0, negotiates VERSION_1 and BYPASS_CONFIG, sets up its request
 * queue (no interrupt: polled) and sets DRIVER_OK. Returns NULL, or what failed. */
const char *viommu_init(struct viommu *v);
/* The configuration's bypass bit: with it set, an endpoint attached to no domain reaches guest
 * memory untranslated; cleared, it reaches nothing. */
void viommu_set_bypass(struct viommu *v, int on);
/* Each returns the request's status, or VIOMMU_TIMEOUT. */
int viommu_attach(struct viommu *v, uint32_t domain, uint32_t endpoint);
int viommu_detach(struct viommu *v, uint32_t domain, uint32_t endpoint);
int viommu_map(struct viommu *v, uint32_t domain, uint64_t iova, uint64_t gpa, uint64_t size,
               uint32_t flags);
int viommu_unmap(struct viommu *v, uint32_t domain, uint64_t iova, uint64_t size);

#endif
