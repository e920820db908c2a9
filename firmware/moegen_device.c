/* moegen device driver; see moegen_device.h. */
#define _POSIX_C_SOURCE 200809L
#include "moegen_device.h"

#include <time.h>

static unsigned long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long)ts.tv_sec * 1000ul + (unsigned long)(ts.tv_nsec / 1000000);
}

static int read_reg(moegen_device *dev, uint32_t offset, uint32_t *value)
{
    return moegen_read_csr(dev->link, offset, value, 1);
}

int moegen_dev_open(moegen_device *dev, moegen_link *link, unsigned wait_ms)
{
    static const uint32_t offsets[3] = {MOEGEN_REG_ID, MOEGEN_REG_VERSION, MOEGEN_REG_CONFIG_HASH};
    uint32_t values[3];
    dev->link = link;
    dev->wait_ms = wait_ms;
    dev->fence = 0;
    dev->error = 0;
    dev->mismatch = 0;
    for (int i = 0; i < 3; i++) {
        int rc = read_reg(dev, offsets[i], &values[i]);
        if (rc != 0)
            return rc;
    }
    if (values[0] != MOEGEN_ID_VALUE || values[1] >> 16 != MOEGEN_MAP_VERSION >> 16
        || values[2] != MOEGEN_CONFIG_HASH) {
        dev->mismatch = values[0] != MOEGEN_ID_VALUE ? MOEGEN_REG_ID
                        : values[1] >> 16 != MOEGEN_MAP_VERSION >> 16 ? MOEGEN_REG_VERSION
                                                                      : MOEGEN_REG_CONFIG_HASH;
        return MOEGEN_EMISMATCH;
    }
    return 0;
}

const char *moegen_dev_strerror(int code)
{
    switch (code) {
    case MOEGEN_EMISMATCH:
        return "the device was built from another config (ID, VERSION or CONFIG_HASH differ)";
    case MOEGEN_EDEVICE:
        return "the device refused a command (see its ERROR register)";
    case MOEGEN_EWAIT:
        return "the device did not finish in time";
    default:
        return moegen_strerror(code);
    }
}

static int submit(moegen_device *dev, const uint32_t *words, size_t count, unsigned long deadline)
{
    for (;;) {
        int rc = moegen_submit(dev->link, words, count);
        if (rc != MOEGEN_QUEUE_FULL)
            return rc;
        if (now_ms() > deadline)
            return MOEGEN_EWAIT;
    }
}

int moegen_dev_execute(moegen_device *dev, const uint32_t *commands, size_t count)
{
    unsigned long deadline = now_ms() + dev->wait_ms;
    uint32_t fence[MOEGEN_COMMAND_WORDS] = {MOEGEN_CMD_FENCE};
    uint32_t value;
    int rc;
    for (size_t start = 0; start < count; start += MOEGEN_QUEUE_COMMANDS) {
        size_t n = count - start < MOEGEN_QUEUE_COMMANDS ? count - start : MOEGEN_QUEUE_COMMANDS;
        rc = submit(dev, commands + start * MOEGEN_COMMAND_WORDS, n * MOEGEN_COMMAND_WORDS, deadline);
        if (rc != 0)
            return rc;
    }
    dev->fence = dev->fence == 0xFFFFFFFFu ? 1 : dev->fence + 1;
    fence[1] = dev->fence;
    rc = submit(dev, fence, MOEGEN_COMMAND_WORDS, deadline);
    if (rc != 0)
        return rc;
    for (;;) {
        if ((rc = read_reg(dev, MOEGEN_REG_ERROR, &value)) != 0)
            return rc;
        if (value != 0) {
            uint32_t clear = 1;
            dev->error = value;
            rc = moegen_write_csr(dev->link, MOEGEN_REG_CONTROL, &clear, 1);
            return rc != 0 ? rc : MOEGEN_EDEVICE;
        }
        if ((rc = read_reg(dev, MOEGEN_REG_FENCE, &value)) != 0)
            return rc;
        if (value == dev->fence)
            return 0;
        if (now_ms() > deadline)
            return MOEGEN_EWAIT;
    }
}

int moegen_dev_run_expert(moegen_device *dev, uint32_t image_addr, uint16_t expert, uint16_t tokens,
                          uint32_t x_addr, uint32_t table_addr, uint32_t out_addr)
{
    uint32_t commands[3 * MOEGEN_COMMAND_WORDS] = {
        MOEGEN_CMD_ACC_CLEAR, tokens, 0, 0, 0, 0, 0, 0,
        MOEGEN_CMD_RUN_EXPERT, image_addr, (uint32_t)expert | (uint32_t)tokens << 16, x_addr, table_addr, 0, 0, 0,
        MOEGEN_CMD_ACC_STORE, out_addr, tokens, 0, 0, 0, 0, 0,
    };
    return moegen_dev_execute(dev, commands, 3);
}
