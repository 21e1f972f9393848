"""virtio devices: the split virtqueue, the modern PCI transport, and the device backends
(entropy, block, network), one module each."""
