/* Exercises the C link library against a device model: CSR and memory round trips, a
 * submit, and a bad address. Prints one line per check; exits non-zero on a failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moegen_link.h"

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                  \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fputc('\n', stderr);                                                                  \
            return 1;                                                                             \
        }                                                                                         \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET MAX_PAYLOAD\n", argv[0]);
        return 2;
    }
    moegen_link link;
    int rc = moegen_link_open_unix(&link, argv[1], (size_t)atoi(argv[2]));
    CHECK(rc == 0, "open: %s", moegen_strerror(rc));
    link.timeout_ms = 20;
    link.retries = 60;

    uint32_t words[3] = {0x11223344u, 5u, 0xFFFFFFFFu}, back[3] = {0};
    CHECK((rc = moegen_write_csr(&link, 0x10, words, 3)) == 0, "write_csr: %s", moegen_strerror(rc));
    CHECK((rc = moegen_read_csr(&link, 0x10, back, 3)) == 0, "read_csr: %s", moegen_strerror(rc));
    CHECK(memcmp(words, back, sizeof words) == 0, "csr words differ");

    static uint8_t data[3000], got[3000];
    for (unsigned round = 0; round < 20; round++) {
        for (size_t i = 0; i < sizeof data; i++)
            data[i] = (uint8_t)(i * 7 + round * 13);
        uint32_t address = 97 * round;
        CHECK((rc = moegen_write_mem(&link, address, data, sizeof data)) == 0, "write_mem: %s", moegen_strerror(rc));
        CHECK((rc = moegen_read_mem(&link, address, got, sizeof got)) == 0, "read_mem: %s", moegen_strerror(rc));
        CHECK(memcmp(data, got, sizeof data) == 0, "memory differs in round %u", round);
        uint32_t command = round;
        CHECK((rc = moegen_submit(&link, &command, 1)) == 0, "submit: %s", moegen_strerror(rc));
    }
    rc = moegen_read_mem(&link, 0xFFFFFF00u, got, 16);
    CHECK(rc == MOEGEN_BAD_ADDRESS, "bad address answered %s", moegen_strerror(rc));
    printf("ok requests=%lu resent=%lu dropped=%lu\n", link.requests, link.resent, link.dropped);
    moegen_link_close(&link);
    return 0;
}
