/* moegen host link in C; see moegen_link.h and moegen/golden/link.py. */
#include "moegen_link.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SYNC_REQUEST 0xA5
#define SYNC_RESPONSE 0x5A
#define REQUEST_HEADER 10
#define RESPONSE_HEADER 6

uint32_t moegen_crc32(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v); put16(p + 2, v >> 16); }
static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static uint32_t get32(const uint8_t *p) { return get16(p) | get16(p + 2) << 16; }

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

static int write_all(int fd, const uint8_t *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return MOEGEN_EIO;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read bytes until a response frame for (seq, opcode) with a good CRC arrives or the
 * deadline passes. Returns its status (>= 0) and fills payload; or MOEGEN_ETIMEOUT. */
static int await_response(moegen_link *link, uint8_t opcode, uint8_t *payload, size_t *payload_len,
                          long deadline) {
    static uint8_t frame[RESPONSE_HEADER + MOEGEN_LINK_MAX_PAYLOAD + 4];
    size_t have = 0;
    for (;;) {
        /* drop bytes before a sync byte */
        size_t start = 0;
        while (start < have && frame[start] != SYNC_RESPONSE)
            start++;
        memmove(frame, frame + start, have - start);
        have -= start;
        if (have >= RESPONSE_HEADER) {
            size_t len = get16(frame + 4);
            if (len > link->max_payload) {
                link->dropped++;
                memmove(frame, frame + 1, --have);
                continue;
            }
            size_t total = RESPONSE_HEADER + len + 4;
            if (have >= total) {
                int good = moegen_crc32(0, frame + 1, total - 5) == get32(frame + total - 4);
                if (good && frame[1] == link->seq && frame[2] == opcode) {
                    memcpy(payload, frame + RESPONSE_HEADER, len);
                    *payload_len = len;
                    return frame[3];
                }
                link->dropped += !good;
                memmove(frame, frame + total, have - total);
                have -= total;
                continue;
            }
        }
        long left = deadline - now_ms();
        if (left <= 0)
            return MOEGEN_ETIMEOUT;
        struct pollfd pfd = {.fd = link->fd, .events = POLLIN};
        int ready = poll(&pfd, 1, (int)left);
        if (ready < 0 && errno != EINTR)
            return MOEGEN_EIO;
        if (ready <= 0)
            continue;
        ssize_t n = read(link->fd, frame + have, sizeof frame - have);
        if (n <= 0)
            return MOEGEN_EIO;
        have += (size_t)n;
    }
}

static int request(moegen_link *link, uint8_t opcode, uint32_t address, const void *data, size_t write_len,
                   void *out, size_t read_len) {
    static uint8_t frame[REQUEST_HEADER + MOEGEN_LINK_MAX_PAYLOAD + 4];
    static uint8_t payload[MOEGEN_LINK_MAX_PAYLOAD];
    if (write_len > link->max_payload || read_len > link->max_payload)
        return MOEGEN_EINVAL;
    frame[0] = SYNC_REQUEST;
    frame[1] = link->seq;
    frame[2] = opcode;
    frame[3] = 0;
    put32(frame + 4, address);
    put16(frame + 8, (uint32_t)(write_len ? write_len : read_len));
    if (write_len)
        memcpy(frame + REQUEST_HEADER, data, write_len);
    size_t len = REQUEST_HEADER + write_len;
    put32(frame + len, moegen_crc32(0, frame + 1, len - 1));
    link->requests++;
    for (unsigned attempt = 0; attempt < link->retries; attempt++) {
        link->resent += attempt > 0;
        int rc = write_all(link->fd, frame, len + 4);
        if (rc)
            return rc;
        size_t got = 0;
        rc = await_response(link, opcode, payload, &got, now_ms() + (long)link->timeout_ms);
        if (rc == MOEGEN_ETIMEOUT)
            continue;
        if (rc != MOEGEN_OK)
            return rc;
        if (got != read_len)
            return MOEGEN_EPROTO;
        if (read_len)
            memcpy(out, payload, read_len);
        return MOEGEN_OK;
    }
    return MOEGEN_ETIMEOUT;
}

static int next(moegen_link *link, uint8_t opcode, uint32_t address, const void *data, size_t write_len,
                void *out, size_t read_len) {
    link->seq = (uint8_t)(link->seq % 255u + 1u); /* 1..255; 0 starts a session */
    return request(link, opcode, address, data, write_len, out, read_len);
}

int moegen_link_open_fd(moegen_link *link, int fd, size_t max_payload) {
    if (max_payload == 0 || max_payload > MOEGEN_LINK_MAX_PAYLOAD)
        return MOEGEN_EINVAL;
    memset(link, 0, sizeof *link);
    link->fd = fd;
    link->timeout_ms = 1000;
    link->retries = 8;
    link->max_payload = max_payload;
    link->seq = 0;
    return request(link, MOEGEN_OP_NOP, 0, NULL, 0, NULL, 0);
}

int moegen_link_open_unix(moegen_link *link, const char *path, size_t max_payload) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return MOEGEN_EINVAL;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return MOEGEN_EIO;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return MOEGEN_EIO;
    }
    int rc = moegen_link_open_fd(link, fd, max_payload);
    if (rc)
        close(fd);
    return rc;
}

void moegen_link_close(moegen_link *link) {
    if (link->fd >= 0)
        close(link->fd);
    link->fd = -1;
}

const char *moegen_strerror(int code) {
    switch (code) {
    case MOEGEN_OK: return "ok";
    case MOEGEN_BAD_OPCODE: return "device: bad opcode";
    case MOEGEN_BAD_ADDRESS: return "device: bad address";
    case MOEGEN_BAD_LENGTH: return "device: bad length";
    case MOEGEN_QUEUE_FULL: return "device: command queue full";
    case MOEGEN_ETIMEOUT: return "no valid response after every retry";
    case MOEGEN_EIO: return "transport error";
    case MOEGEN_EINVAL: return "invalid argument";
    case MOEGEN_EPROTO: return "protocol violation by the device";
    default: return "unknown error";
    }
}

int moegen_nop(moegen_link *link) { return next(link, MOEGEN_OP_NOP, 0, NULL, 0, NULL, 0); }

static int words_out(moegen_link *link, uint8_t opcode, uint32_t address, const uint32_t *values, size_t count) {
    uint8_t buf[MOEGEN_LINK_MAX_PAYLOAD];
    if (count * 4 > link->max_payload)
        return MOEGEN_EINVAL;
    for (size_t i = 0; i < count; i++)
        put32(buf + 4 * i, values[i]);
    return next(link, opcode, address, buf, count * 4, NULL, 0);
}

int moegen_read_csr(moegen_link *link, uint32_t address, uint32_t *values, size_t count) {
    uint8_t buf[MOEGEN_LINK_MAX_PAYLOAD];
    if (count * 4 > link->max_payload)
        return MOEGEN_EINVAL;
    int rc = next(link, MOEGEN_OP_READ_CSR, address, NULL, 0, buf, count * 4);
    for (size_t i = 0; rc == MOEGEN_OK && i < count; i++)
        values[i] = get32(buf + 4 * i);
    return rc;
}

int moegen_write_csr(moegen_link *link, uint32_t address, const uint32_t *values, size_t count) {
    return words_out(link, MOEGEN_OP_WRITE_CSR, address, values, count);
}

int moegen_submit(moegen_link *link, const uint32_t *words, size_t count) {
    return words_out(link, MOEGEN_OP_SUBMIT, 0, words, count);
}

int moegen_read_mem(moegen_link *link, uint32_t address, void *data, size_t length) {
    uint8_t *p = data;
    for (size_t done = 0; done < length;) {
        size_t n = length - done < link->max_payload ? length - done : link->max_payload;
        int rc = next(link, MOEGEN_OP_READ_MEM, address + (uint32_t)done, NULL, 0, p + done, n);
        if (rc)
            return rc;
        done += n;
    }
    return MOEGEN_OK;
}

int moegen_write_mem(moegen_link *link, uint32_t address, const void *data, size_t length) {
    const uint8_t *p = data;
    for (size_t done = 0; done < length;) {
        size_t n = length - done < link->max_payload ? length - done : link->max_payload;
        int rc = next(link, MOEGEN_OP_WRITE_MEM, address + (uint32_t)done, p + done, n, NULL, 0);
        if (rc)
            return rc;
        done += n;
    }
    return MOEGEN_OK;
}
