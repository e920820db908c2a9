/* Runs one expert through the C device driver and compares the result with golden's.
 *
 * usage: device_check SOCKET JOB
 * JOB (little-endian): u32 writes, then per write u32 addr, u32 length, bytes; then u32
 * image_addr, expert, tokens, x_addr, table_addr, out_addr, expected length, expected bytes.
 * Exit: 0 match, 1 mismatch, 2 driver error (named on stderr).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moegen_device.h"

static uint32_t take_u32(const unsigned char **p)
{
    uint32_t v = (uint32_t)(*p)[0] | (uint32_t)(*p)[1] << 8 | (uint32_t)(*p)[2] << 16 | (uint32_t)(*p)[3] << 24;
    *p += 4;
    return v;
}

static unsigned char *slurp(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *data;
    long n;
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = malloc((size_t)n);
    if (data && fread(data, 1, (size_t)n, f) != (size_t)n) {
        free(data);
        data = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return data;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "device_check: %s: %s\n", what, moegen_dev_strerror(rc));
    return 2;
}

int main(int argc, char **argv)
{
    moegen_link link;
    moegen_device dev;
    size_t size;
    const unsigned char *p;
    unsigned char *job, *got;
    uint32_t writes, image_addr, expert, tokens, x_addr, table_addr, out_addr, length;
    int rc;
    if (argc != 3) {
        fprintf(stderr, "usage: device_check SOCKET JOB\n");
        return 2;
    }
    job = slurp(argv[2], &size);
    if (!job) {
        fprintf(stderr, "device_check: cannot read %s\n", argv[2]);
        return 2;
    }
    if ((rc = moegen_link_open_unix(&link, argv[1], MOEGEN_MAX_PAYLOAD)) != 0)
        return fail("connect", rc);
    if ((rc = moegen_dev_open(&dev, &link, 60000)) != 0) {
        fprintf(stderr, "device_check: register 0x%03x differs\n", (unsigned)dev.mismatch);
        return fail("identity", rc);
    }
    p = job;
    writes = take_u32(&p);
    for (uint32_t i = 0; i < writes; i++) {
        uint32_t addr = take_u32(&p), n = take_u32(&p);
        if ((rc = moegen_write_mem(&link, addr, p, n)) != 0)
            return fail("write", rc);
        p += n;
    }
    image_addr = take_u32(&p);
    expert = take_u32(&p);
    tokens = take_u32(&p);
    x_addr = take_u32(&p);
    table_addr = take_u32(&p);
    out_addr = take_u32(&p);
    length = take_u32(&p);
    rc = moegen_dev_run_expert(&dev, image_addr, (uint16_t)expert, (uint16_t)tokens, x_addr, table_addr, out_addr);
    if (rc == MOEGEN_EDEVICE)
        fprintf(stderr, "device_check: ERROR register 0x%04x\n", (unsigned)dev.error);
    if (rc != 0)
        return fail("run", rc);
    got = malloc(length);
    if (!got || (rc = moegen_read_mem(&link, out_addr, got, length)) != 0)
        return fail("read", got ? rc : MOEGEN_EINVAL);
    rc = memcmp(got, p, length) != 0;
    printf("%s: %u tokens, %u result bytes, %lu requests, %lu resent\n", rc ? "MISMATCH" : "ok",
           (unsigned)tokens, (unsigned)length, link.requests, link.resent);
    moegen_link_close(&link);
    free(got);
    free(job);
    return rc;
}
