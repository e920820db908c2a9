/* moegen device driver: identity check, commands, fences, over the host link.
 *
 * Needs the generated moegen_regs.h of the device's config (`moegen generate --block
 * accelerator`): register offsets, identity, command and error codes. Every wait is
 * bounded by `wait_ms`; a command the device refuses returns MOEGEN_EDEVICE with the
 * device's ERROR register in `dev->error` (cleared on the device).
 */
#ifndef MOEGEN_DEVICE_H
#define MOEGEN_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "moegen_link.h"
#include "moegen_regs.h"

enum moegen_device_error {
    MOEGEN_EMISMATCH = -5, /* ID, VERSION or CONFIG_HASH differ from moegen_regs.h */
    MOEGEN_EDEVICE = -6,   /* the device refused a command: see dev->error */
    MOEGEN_EWAIT = -7,     /* the commands did not finish within wait_ms */
};

typedef struct {
    moegen_link *link;
    unsigned wait_ms;
    uint32_t fence;
    uint32_t error;    /* ERROR register of the last refused command */
    uint32_t mismatch; /* the register that differed, for MOEGEN_EMISMATCH */
} moegen_device;

/* Check ID, VERSION (major) and CONFIG_HASH against moegen_regs.h. */
int moegen_dev_open(moegen_device *dev, moegen_link *link, unsigned wait_ms);
const char *moegen_dev_strerror(int code);

/* Submit `count` commands (MOEGEN_COMMAND_WORDS words each) followed by a FENCE, and wait
 * for the fence. */
int moegen_dev_execute(moegen_device *dev, const uint32_t *commands, size_t count);

/* acc[0..tokens) = 0; run the expert image at `image_addr` on `tokens` tokens of the
 * activation buffer at `x_addr` with the table at `table_addr` (row | weight << 16 per
 * token); store the accumulator rows at `out_addr` (tokens x MOEGEN_HIDDEN int32). */
int moegen_dev_run_expert(moegen_device *dev, uint32_t image_addr, uint16_t expert, uint16_t tokens,
                          uint32_t x_addr, uint32_t table_addr, uint32_t out_addr);

#endif
