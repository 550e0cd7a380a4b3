/* flood.c: a small traffic generator for the benchmarks (sendmmsg, one core).
 *
 *   flood [-f FILE | -p PAYLOAD [-x OFFSET]] [-r RATE] [-w START] [-1] DST_IPV4 PORT SECONDS
 *
 * Without -f or -p: knock-shaped junk (161 random bytes, first byte 0x01, the
 * version) from the sender's own address.
 * With -p: the bytes of PAYLOAD (up to 1400) in every datagram, from the
 * sender's own address (a replay flood); with -x OFFSET, bytes from OFFSET on
 * are random, different in each of 4096 variants (a live knock tag in front
 * of forged rest).
 * With -f: the records of FILE, each 4 bytes of IPv4 source address followed
 * by a 161-byte payload, sent in order from a raw socket (IP_HDRINCL) so that
 * every record leaves from its own source address; the file is cycled unless
 * -1 is given (each record once).
 * -r RATE paces the sending at RATE packets per second (default: as fast as
 * one core can).  -w START waits until the Unix time START (the wall clock)
 * before it sends (so that one flood can take over from another at a given
 * moment: bench_flood --recapture).  Stops SECONDS after it started sending
 * (or, with -1, at the end of the file), or earlier at SIGTERM or SIGINT.
 *
 * Prints "sent N packets in S s".  Run only by the scripts in benchmarks/ and
 * tests/netns/test_captured_tag.py, which compile it into a temporary
 * directory and run it only inside network namespaces they create. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { POOL = 4096, BATCH = 64, SIZE = 161, RECORD = 4 + SIZE, FRAME = 20 + 8 + SIZE,
       MAX_PAYLOAD = 1400 };

static volatile sig_atomic_t stopped;  /* SIGTERM or SIGINT: stop now, and say what was sent */

static void stop(int sig) {
    (void)sig;
    stopped = 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Frames (IPv4 + UDP header + payload) or bare payloads, ready to send. */
static unsigned char *load(const char *path, struct in_addr dst, int port, size_t *count) {
    FILE *file = fopen(path, "rb");
    if (!file) {
        perror(path);
        exit(1);
    }
    fseek(file, 0, SEEK_END);
    long size = ftell(file);
    rewind(file);
    if (size <= 0 || size % RECORD) {
        fprintf(stderr, "%s: not a whole number of %d-byte records\n", path, RECORD);
        exit(2);
    }
    *count = size / RECORD;
    unsigned char *frames = calloc(*count, FRAME);
    unsigned char record[RECORD];
    for (size_t i = 0; i < *count; i++) {
        if (fread(record, 1, RECORD, file) != RECORD) {
            perror(path);
            exit(1);
        }
        unsigned char *frame = frames + i * FRAME;
        struct iphdr *ip = (struct iphdr *)frame;
        struct udphdr *udp = (struct udphdr *)(frame + 20);
        ip->version = 4;
        ip->ihl = 5;
        ip->ttl = 64;
        ip->protocol = IPPROTO_UDP;
        ip->tot_len = htons(FRAME);
        memcpy(&ip->saddr, record, 4);
        ip->daddr = dst.s_addr;  /* the kernel fills in the id and checksum */
        udp->source = htons(40000 + i % 20000);
        udp->dest = htons(port);
        udp->len = htons(8 + SIZE);
        udp->check = 0;  /* optional over IPv4 */
        memcpy(frame + 28, record + 4, SIZE);
    }
    fclose(file);
    return frames;
}

int main(int argc, char **argv) {
    const char *path = NULL, *payload = NULL;
    double rate = 0, start_at = 0;
    int once = 0, offset = -1, opt;
    while ((opt = getopt(argc, argv, "f:p:x:r:w:1")) != -1) {
        if (opt == 'f') path = optarg;
        else if (opt == 'p') payload = optarg;
        else if (opt == 'x') offset = atoi(optarg);
        else if (opt == 'r') rate = atof(optarg);
        else if (opt == 'w') start_at = atof(optarg);
        else if (opt == '1') once = 1;
        else return 2;
    }
    if (argc - optind != 3) {
        fprintf(stderr, "usage: flood [-f FILE | -p PAYLOAD [-x OFFSET]] [-r RATE] [-w START] "
                        "[-1] DST_IPV4 PORT SECONDS\n");
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[optind + 1]))};
    if (inet_pton(AF_INET, argv[optind], &dst.sin_addr) != 1) {
        fprintf(stderr, "flood: bad address %s\n", argv[optind]);
        return 2;
    }
    size_t count, length;
    unsigned char *items;
    int fd;
    if (path) {
        items = load(path, dst.sin_addr, atoi(argv[optind + 1]), &count);
        length = FRAME;
        fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);  /* implies IP_HDRINCL */
    } else if (payload) {
        unsigned char bytes[MAX_PAYLOAD];
        FILE *file = fopen(payload, "rb");
        if (!file) {
            perror(payload);
            return 1;
        }
        length = fread(bytes, 1, sizeof bytes, file);
        fclose(file);
        count = offset >= 0 ? POOL : 1;
        items = malloc(count * length);
        FILE *random = fopen("/dev/urandom", "rb");
        for (size_t i = 0; i < count; i++) {
            memcpy(items + i * length, bytes, length);
            if (offset >= 0 && (size_t)offset < length &&
                fread(items + i * length + offset, 1, length - offset, random) != length - offset) {
                perror("urandom");
                return 1;
            }
        }
        fclose(random);
        fd = socket(AF_INET, SOCK_DGRAM, 0);
    } else {
        count = POOL;
        length = SIZE;
        items = malloc(POOL * SIZE);
        FILE *random = fopen("/dev/urandom", "rb");
        if (!random || fread(items, 1, POOL * SIZE, random) != POOL * SIZE) {
            perror("urandom");
            return 1;
        }
        fclose(random);
        for (int i = 0; i < POOL; i++) items[i * SIZE] = 1;
        fd = socket(AF_INET, SOCK_DGRAM, 0);
    }
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    int buffer = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    if (start_at > 0) {  /* wait for the wall clock to reach START */
        struct timespec wall;
        clock_gettime(CLOCK_REALTIME, &wall);
        double left = start_at - (wall.tv_sec + wall.tv_nsec / 1e9);
        if (left > 0) {
            struct timespec pause = {(time_t)left, (long)((left - (time_t)left) * 1e9)};
            nanosleep(&pause, NULL);
        }
    }
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    double start = now(), deadline = start + atof(argv[optind + 2]);
    unsigned long sent = 0;
    for (;;) {
        double t = now();
        if (stopped || t >= deadline || (once && sent >= count)) break;
        int batch = BATCH;
        if (rate > 0) {
            double due = (t - start) * rate - sent;  /* packets owed by now */
            if (due < 1) {
                struct timespec pause = {0, 50000};  /* 50 us */
                nanosleep(&pause, NULL);
                continue;
            }
            if (due < batch) batch = (int)due;
        }
        if (once && count - sent < (unsigned long)batch) batch = count - sent;
        for (int j = 0; j < batch; j++) {
            iov[j].iov_base = items + ((sent + j) % count) * length;
            iov[j].iov_len = length;
            msgs[j].msg_hdr.msg_iov = &iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
            msgs[j].msg_hdr.msg_name = &dst;
            msgs[j].msg_hdr.msg_namelen = sizeof dst;
        }
        int n = sendmmsg(fd, msgs, batch, 0);
        if (n > 0) sent += n;
    }
    printf("sent %lu packets in %.2f s\n", sent, now() - start);
    return 0;
}
