# Shared build settings for freestanding pyvmm guests (included by firmware/Makefile and
# guests/Makefile). FW_DIR must point at this directory.

# The system gcc unless the caller names another compiler (make's built-in default is `cc`).
ifeq ($(origin CC),default)
CC := gcc
endif
ifeq ($(origin AR),default)
AR := ar
endif

FW_CFLAGS := -ffreestanding -fno-pic -no-pie -nostdlib -static -mno-red-zone \
	-mgeneral-regs-only -fno-stack-protector -O2 -Wall -Werror -std=gnu11 \
	-fcf-protection=none -fno-asynchronous-unwind-tables -fno-unwind-tables \
	-fno-tree-loop-distribute-patterns -mstringop-strategy=loop \
	-fno-jump-tables -mcmodel=small -I$(FW_DIR)/include -MMD -MP
FW_ASFLAGS := -fno-pic -no-pie -Wall -Werror -I$(FW_DIR)/include -MMD -MP
FW_LDFLAGS := -nostdlib -static -no-pie -Wl,-T,$(FW_DIR)/guest.ld -Wl,--build-id=none \
	-Wl,-z,max-page-size=0x1000 -Wl,-z,noexecstack

FW_BUILD := $(FW_DIR)/build
FW_LIB   := $(FW_BUILD)/libpyvmmfw.a
FW_CRT0  := $(FW_BUILD)/start.o

# The two steps of a guest (guests/Makefile, guest.mk): its .o from its .c, and its image from
# the .o (the first prerequisite) linked after crt0, against the runtime.
FW_GUEST_COMPILE = $(CC) $(FW_CFLAGS) -c -o $@ $<
FW_GUEST_LINK = $(CC) $(FW_LDFLAGS) -o $@ $(FW_CRT0) $< $(FW_LIB)
