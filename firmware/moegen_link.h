/* moegen host link: the framed CRC-32 protocol of moegen.golden.link, in C.
 *
 * One request frame, one response frame; a request without a valid response is resent
 * with the same sequence number (the device answers a retry without executing it twice)
 * up to `retries` times, each waiting `timeout_ms`. Nothing blocks forever.
 * Return values: 0 on success, a positive moegen_status from the device, or a negative
 * MOEGEN_E* code from this side.
 */
#ifndef MOEGEN_LINK_H
#define MOEGEN_LINK_H

#include <stddef.h>
#include <stdint.h>

enum moegen_opcode {
    MOEGEN_OP_NOP = 0,
    MOEGEN_OP_READ_CSR = 1,
    MOEGEN_OP_WRITE_CSR = 2,
    MOEGEN_OP_READ_MEM = 3,
    MOEGEN_OP_WRITE_MEM = 4,
    MOEGEN_OP_SUBMIT = 5,
};

enum moegen_status {
    MOEGEN_OK = 0,
    MOEGEN_BAD_OPCODE = 1,
    MOEGEN_BAD_ADDRESS = 2,
    MOEGEN_BAD_LENGTH = 3,
    MOEGEN_QUEUE_FULL = 4,
};

enum moegen_error {
    MOEGEN_ETIMEOUT = -1, /* no valid response after every retry */
    MOEGEN_EIO = -2,      /* the transport failed (closed, read/write error) */
    MOEGEN_EINVAL = -3,   /* bad argument on this side */
    MOEGEN_EPROTO = -4,   /* a valid frame that breaks the protocol */
};

#define MOEGEN_LINK_MAX_PAYLOAD 4096

typedef struct {
    int fd;
    uint8_t seq;
    unsigned timeout_ms;
    unsigned retries;
    size_t max_payload; /* the device's limit, <= MOEGEN_LINK_MAX_PAYLOAD */
    unsigned long requests, resent, dropped;
} moegen_link;

uint32_t moegen_crc32(uint32_t crc, const void *data, size_t len);

/* Connect to a Unix socket (the Verilator harness) or adopt an open file descriptor
 * (a serial port configured by the caller). Both start a session (a seq-0 NOP). */
int moegen_link_open_unix(moegen_link *link, const char *path, size_t max_payload);
int moegen_link_open_fd(moegen_link *link, int fd, size_t max_payload);
void moegen_link_close(moegen_link *link);
const char *moegen_strerror(int code);

int moegen_nop(moegen_link *link);
int moegen_read_csr(moegen_link *link, uint32_t address, uint32_t *values, size_t count);
int moegen_write_csr(moegen_link *link, uint32_t address, const uint32_t *values, size_t count);
int moegen_read_mem(moegen_link *link, uint32_t address, void *data, size_t length);
int moegen_write_mem(moegen_link *link, uint32_t address, const void *data, size_t length);
int moegen_submit(moegen_link *link, const uint32_t *words, size_t count);

#endif
