"""The benchmark's workload: a static C program in a busybox image, built at run time with gcc.

It writes its own upper dir (NFILES files of FILE_BYTES each under /data), fills SIZE MiB of
memory with incompressible data, then appends "MONOTONIC REALTIME" (seconds, ns precision) to
/ticks every 5 ms. With TOUCH=1 a second thread rewrites every word of that memory every
250 ms (the next pass starts at once if one takes longer). The pause a move causes is read
from /ticks afterwards (REALTIME: CRIU may restore into a time namespace that hides the freeze
from CLOCK_MONOTONIC). Nothing is written to stdout, whose pipe a by-hand restore does not keep.
"""

import subprocess
import tempfile
from pathlib import Path

from runtime.imagebuild import build_image, busybox_layer

IMAGE = "benchload:latest"
BINARY = "/bin/benchload"
TICKS = "ticks"  # in the container's root, so in its upper dir on the host
TICK_S = 0.005
TOUCH_S = 0.25
NFILES = 5000
FILE_BYTES = 20_000  # 5,000 files of 20 kB: an upper dir of 100 MB

SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t *mem;
static size_t words;
static uint64_t seed = 0x9e3779b97f4a7c15ULL;

static uint64_t next_random(void) { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; return seed; }

static void add_ns(struct timespec *t, long ns) {
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) { t->tv_nsec -= 1000000000L; t->tv_sec++; }
}

static int before(const struct timespec *a, const struct timespec *b) {
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* sleep until *next, then move it on by period; never try to catch up on missed periods */
static void pace(struct timespec *next, long period_ns) {
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL);
    add_ns(next, period_ns);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (before(next, &now)) *next = now;
}

static void *toucher(void *arg) {
    (void)arg;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t round = 1;; round++) {
        for (size_t i = 0; i < words; i++) mem[i] += round;
        pace(&next, 250000000L);
    }
    return NULL;
}

static void make_files(long nfiles, long file_bytes) {
    char *buf = malloc(file_bytes + 8);
    char path[64];
    mkdir("/data", 0755);
    for (long f = 0; f < nfiles; f++) {
        snprintf(path, sizeof path, "/data/%05ld", f);
        if (access(path, F_OK) == 0) continue;
        for (long i = 0; i < file_bytes; i += 8) { uint64_t r = next_random(); memcpy(buf + i, &r, 8); }
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, buf, file_bytes) != file_bytes) { perror(path); exit(1); }
        close(fd);
    }
    free(buf);
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: benchload SIZE_MIB TOUCH NFILES FILE_BYTES\n"); return 2; }
    size_t size = (size_t)atol(argv[1]) << 20;
    int touch = atoi(argv[2]);
    make_files(atol(argv[3]), atol(argv[4]));
    words = size / sizeof(uint64_t);
    mem = malloc(size);
    if (!mem) { perror("malloc"); return 1; }
    for (size_t i = 0; i < words; i++) mem[i] = next_random();
    int fd = open("/ticks", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) { perror("/ticks"); return 1; }
    pthread_t t;
    if (touch && pthread_create(&t, NULL, toucher, NULL) != 0) { perror("pthread_create"); return 1; }
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        struct timespec mono, real;
        char line[64];
        clock_gettime(CLOCK_MONOTONIC, &mono);
        clock_gettime(CLOCK_REALTIME, &real);
        int n = snprintf(line, sizeof line, "%lld.%09ld %lld.%09ld\n", (long long)mono.tv_sec, mono.tv_nsec,
                         (long long)real.tv_sec, real.tv_nsec);
        if (write(fd, line, n) != n) return 1;
        pace(&next, 5000000L);
    }
}
"""


def build(out: Path) -> Path:
    """Compile the workload and write an image archive holding it and busybox to OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        src, binary = Path(tmp) / "benchload.c", Path(tmp) / "benchload"
        src.write_text(SOURCE)
        p = subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(binary), str(src)],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"gcc failed (./scripts/setup installs gcc and libc6-dev): {p.stderr}")
        files = {**busybox_layer(), BINARY.lstrip("/"): binary}
        build_image(out, files, fmt="oci-archive", name=IMAGE, config={"Cmd": [BINARY]})
    return out


def argv(size_mib: int, touch: bool) -> list[str]:
    """The container's command for SIZE_MIB of memory, idle or touched."""
    return [BINARY, str(size_mib), "1" if touch else "0", str(NFILES), str(FILE_BYTES)]
