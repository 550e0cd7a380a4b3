/* fuzz_send.c: sends prepared datagrams, each from its own source address,
 * each once (sendmmsg on a raw socket, one core).  For benchmarks/fuzz_live.py.
 *
 *   fuzz_send [-r RATE] DST_IPV4 PORT FILE
 *
 * FILE is a sequence of records: 4 bytes of IPv4 source address, 2 bytes of
 * UDP source port and 2 bytes of payload length (both big-endian), then the
 * payload (0 to MAX_PAYLOAD bytes).  Every record leaves as one IPv4/UDP
 * datagram from a raw socket (IP_HDRINCL), so the source address is whatever
 * the record says (a forged one included), in file order.
 * -r RATE paces the sending at RATE datagrams per second (default: as fast
 * as one core can).
 *
 * Prints "sent N packets in S s" (N < the records only if the kernel refused
 * some; their count follows as "failed F").  Run only by the scripts in
 * benchmarks/, which compile it into a temporary directory and run it only
 * inside network namespaces they create, at addresses inside them. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { BATCH = 64, HEAD = 8, MAX_PAYLOAD = 1400, FRAME_MAX = 20 + 8 + MAX_PAYLOAD };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct frame {
    unsigned char *bytes;
    size_t length;
};

/* Every record of `path` as a ready IPv4 + UDP frame to `dst`:`port`. */
static struct frame *load(const char *path, struct in_addr dst, int port, size_t *count,
                          unsigned char **store) {
    FILE *file = fopen(path, "rb");
    if (!file) {
        perror(path);
        exit(1);
    }
    fseek(file, 0, SEEK_END);
    long size = ftell(file);
    rewind(file);
    unsigned char *raw = malloc(size > 0 ? size : 1);
    if (size < 0 || fread(raw, 1, size, file) != (size_t)size) {
        perror(path);
        exit(1);
    }
    fclose(file);
    size_t records = 0, room = 0;
    for (long at = 0; at < size;) {
        if (size - at < HEAD) {
            fprintf(stderr, "%s: a record is cut short at byte %ld\n", path, at);
            exit(2);
        }
        size_t length = (raw[at + 6] << 8) | raw[at + 7];
        if (length > MAX_PAYLOAD || (size_t)(size - at - HEAD) < length) {
            fprintf(stderr, "%s: bad record length %zu at byte %ld\n", path, length, at);
            exit(2);
        }
        records++;
        room += 28 + length;
        at += HEAD + length;
    }
    struct frame *frames = calloc(records ? records : 1, sizeof *frames);
    unsigned char *bytes = calloc(room ? room : 1, 1);
    size_t at = 0, used = 0;
    for (size_t i = 0; i < records; i++) {
        size_t length = (raw[at + 6] << 8) | raw[at + 7];
        unsigned char *frame = bytes + used;
        struct iphdr *ip = (struct iphdr *)frame;
        struct udphdr *udp = (struct udphdr *)(frame + 20);
        ip->version = 4;
        ip->ihl = 5;
        ip->ttl = 64;
        ip->protocol = IPPROTO_UDP;
        ip->tot_len = htons(28 + length);
        memcpy(&ip->saddr, raw + at, 4);
        ip->daddr = dst.s_addr;  /* the kernel fills in the id and checksum */
        memcpy(&udp->source, raw + at + 4, 2);
        udp->dest = htons(port);
        udp->len = htons(8 + length);
        udp->check = 0;  /* optional over IPv4 */
        memcpy(frame + 28, raw + at + HEAD, length);
        frames[i].bytes = frame;
        frames[i].length = 28 + length;
        used += 28 + length;
        at += HEAD + length;
    }
    free(raw);
    *count = records;
    *store = bytes;
    return frames;
}

int main(int argc, char **argv) {
    double rate = 0;
    int opt;
    while ((opt = getopt(argc, argv, "r:")) != -1) {
        if (opt == 'r') rate = atof(optarg);
        else return 2;
    }
    if (argc - optind != 3) {
        fprintf(stderr, "usage: fuzz_send [-r RATE] DST_IPV4 PORT FILE\n");
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[optind + 1]))};
    if (inet_pton(AF_INET, argv[optind], &dst.sin_addr) != 1) {
        fprintf(stderr, "fuzz_send: bad address %s\n", argv[optind]);
        return 2;
    }
    size_t count;
    unsigned char *store;
    struct frame *frames = load(argv[optind + 2], dst.sin_addr, atoi(argv[optind + 1]), &count,
                                &store);
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);  /* implies IP_HDRINCL */
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    int buffer = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    double start = now();
    size_t next = 0, sent = 0, failed = 0;
    while (next < count) {
        int batch = BATCH;
        if (rate > 0) {
            double due = (now() - start) * rate - next;  /* datagrams owed by now */
            if (due < 1) {
                struct timespec pause = {0, 50000};  /* 50 us */
                nanosleep(&pause, NULL);
                continue;
            }
            if (due < batch) batch = (int)due;
        }
        if (count - next < (size_t)batch) batch = (int)(count - next);
        for (int j = 0; j < batch; j++) {
            iov[j].iov_base = frames[next + j].bytes;
            iov[j].iov_len = frames[next + j].length;
            msgs[j].msg_hdr.msg_iov = &iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
            msgs[j].msg_hdr.msg_name = &dst;
            msgs[j].msg_hdr.msg_namelen = sizeof dst;
        }
        int n = sendmmsg(fd, msgs, batch, 0);
        if (n > 0) {
            next += n;
            sent += n;
        } else if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) {
            struct timespec pause = {0, 100000};  /* the queue is full: 100 us */
            nanosleep(&pause, NULL);
        } else {
            next++;  /* this one the kernel refuses (e.g. EPERM): skip it, count it */
            failed++;
        }
    }
    printf("sent %zu packets in %.2f s\n", sent, now() - start);
    if (failed) printf("failed %zu\n", failed);
    free(frames);
    free(store);
    return 0;
}
