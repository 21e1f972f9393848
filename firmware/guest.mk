# One freestanding test guest from one C file, linked against the runtime (`pyvmm guest build`):
#   make -f firmware/guest.mk SRC=my.c OUT=my.elf OBJ_DIR=DIR [FW_BUILD=DIR]
# The runtime is built first (into FW_BUILD: firmware/build unless told), with fw.mk's flags.
FW_DIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
include $(FW_DIR)/fw.mk

OBJ := $(OBJ_DIR)/$(notdir $(basename $(SRC))).o

.PHONY: all firmware
all: $(OUT)

firmware:
	$(MAKE) -s -C $(FW_DIR) FW_BUILD=$(FW_BUILD)

$(FW_LIB) $(FW_CRT0): firmware

$(OUT): $(OBJ) $(FW_CRT0) $(FW_LIB) $(FW_DIR)/guest.ld
	$(FW_GUEST_LINK)

$(OBJ): $(SRC)
	$(FW_GUEST_COMPILE)
