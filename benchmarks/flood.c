/* flood.c: send knock-shaped junk (161 random bytes, first byte 0x01, the
 * version) to one UDP port as fast as one core can, with sendmmsg.
 *
 *   flood DST_IPV4 PORT SECONDS
 *
 * Prints "sent N packets in S s". Part of benchmarks/bench_flood.py, which
 * compiles it into a temporary directory and runs it only inside network
 * namespaces it creates. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { POOL = 4096, BATCH = 64, SIZE = 161 };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: flood DST_IPV4 PORT SECONDS\n");
        return 2;
    }
    static unsigned char pool[POOL][SIZE];
    FILE *random = fopen("/dev/urandom", "rb");
    if (!random || fread(pool, 1, sizeof pool, random) != sizeof pool) {
        perror("urandom");
        return 1;
    }
    fclose(random);
    for (int i = 0; i < POOL; i++) pool[i][0] = 1;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int buffer = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    double start = now(), deadline = start + atof(argv[3]);
    unsigned long sent = 0, next = 0;
    while (now() < deadline) {
        for (int j = 0; j < BATCH; j++) {
            iov[j].iov_base = pool[(next + j) % POOL];
            iov[j].iov_len = SIZE;
            msgs[j].msg_hdr.msg_iov = &iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
            msgs[j].msg_hdr.msg_name = &dst;
            msgs[j].msg_hdr.msg_namelen = sizeof dst;
        }
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) {
            sent += n;
            next += n;
        }
    }
    printf("sent %lu packets in %.2f s\n", sent, now() - start);
    return 0;
}
