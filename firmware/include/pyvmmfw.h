/* libpyvmmfw: everything a pyvmm test guest needs. See firmware/README.md for the boot contract. */
#ifndef PYVMMFW_H
#define PYVMMFW_H

#include <stdint.h>
#include <stddef.h>
#include <fw/io.h>
#include <fw/serial.h>
#include <fw/exit.h>
#include <fw/string.h>
#include <fw/idt.h>
#include <fw/apic.h>
#include <fw/pic.h>
#include <fw/pci.h>
#include <fw/virtio.h>
#include <fw/viommu.h>

/* The guest's entry point, called by crt0; its return value is the debug-exit code. */
int main(void);

#endif
