/* Talking to the VMM: debug exit, test checkpoints, the benchmark sink, reset, boot info. */
#ifndef FW_EXIT_H
#define FW_EXIT_H

#include <stdint.h>

#define DEBUG_EXIT_PORT  0x501   /* outl(v): the VM ends, pyvmm exits with v & 0xFF */
#define CHECKPOINT_PORT  0x502   /* outl(phase): the host's hook runs before the guest resumes */
#define BENCH_PORT       0x510   /* inl: iteration count N; outl(i): one sink write */

/* Filled by crt0 from the registers the VMM sets at entry. */
extern uint64_t fw_ram_bytes;    /* RDI: guest RAM size in bytes */
extern uint64_t fw_nr_cpus;      /* RSI: number of vCPUs */

/* Ends the VM with exit code (code & 0xFF). If the VMM ignores the write, halts forever. */
void fw_exit(uint32_t code) __attribute__((noreturn));
void fw_checkpoint(uint32_t phase);
/* Pulses the i8042 reset line (0xFE to port 0x64), then CF9 reset; halts if both are ignored. */
void fw_reset(void) __attribute__((noreturn));

#endif
