// The GPU time of every kernel a CUDA program runs, graphs included, summed by kernel name:
// a CUPTI activity tracer that the CUDA driver loads into the program at cuInit.
//
// PEREGRINE_KERNEL_PROFILE times each launch alone with the stream synchronized around it, which
// adds the launch latency to every kernel and turns CUDA graphs off. This reads the timestamps
// the GPU records for each kernel instead, so a step runs as it does in production.
//
// Build and use (on the GPU machine; the header version of the kernel record is picked there):
//   v=$(grep -o 'CUpti_ActivityKernel[0-9]*' $CUDA/include/cupti_activity.h | sort -V | tail -n 1)
//   cc -O2 -shared -fPIC -DKERNEL_RECORD=$v -I$CUDA/include scripts/kernel_trace.c -L$CUDA/lib64 -lcupti -o kernel_trace.so
//   CUDA_INJECTION64_PATH=$PWD/kernel_trace.so peregrine bench ...
// ($CUDA is the toolkit, /usr/local/cuda; older toolkits keep CUPTI under extras/CUPTI.)
// At exit it prints, to stderr, each kernel's calls, total and mean time, and share of the GPU
// time, and the span from the first kernel's start to the last one's end. Kernels that overlap
// (programmatic dependent launch) are counted in full each, so it also prints the time some
// kernel ran (their union) and the gaps where none did: the host's share of the span, such as
// the time between one step's last kernel and the next step's first.
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef KERNEL_RECORD
#define KERNEL_RECORD CUpti_ActivityKernel9
#endif

enum { SLOTS = 4096 };
static struct { char *name; uint64_t calls, ns; } table[SLOTS];
static uint64_t first = UINT64_MAX, last = 0;
// Buffers may complete on CUPTI's thread while the exiting thread flushes the rest.
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t dropped = 0;
// Every kernel's interval, for the union and the gaps.
static struct span { uint64_t start, end; } *spans;
static size_t spanCount = 0, spanCapacity = 0;

static void add(const char *name, uint64_t ns) {
    uint64_t h = 1469598103934665603ull;
    for (const char *c = name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    for (uint64_t i = 0; i < SLOTS; i++) {
        uint64_t s = (h + i) % SLOTS;
        if (!table[s].name) table[s].name = strdup(name);
        if (strcmp(table[s].name, name) == 0) { table[s].calls++; table[s].ns += ns; return; }
    }
}

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *records) {
    *size = 16 << 20;
    *buffer = aligned_alloc(8, *size);
    if (!*buffer) *size = 0;  // CUPTI then drops the records, counted in the report
    *records = 0;
}

static void CUPTIAPI completed(CUcontext context, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    (void)size;
    CUpti_Activity *r = NULL;
    pthread_mutex_lock(&lock);
    size_t lost = 0;
    if (cuptiActivityGetNumDroppedRecords(context, stream, &lost) == CUPTI_SUCCESS) dropped += lost;
    while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && r->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
        KERNEL_RECORD *k = (KERNEL_RECORD *)r;
        add(k->name ? k->name : "?", k->end - k->start);
        if (spanCount == spanCapacity) {
            size_t c = spanCapacity ? 2 * spanCapacity : 1 << 16;
            struct span *grown = realloc(spans, c * sizeof *spans);
            if (grown) { spans = grown; spanCapacity = c; }
        }
        if (spanCount < spanCapacity) spans[spanCount++] = (struct span){k->start, k->end};
        if (k->start < first) first = k->start;
        if (k->end > last) last = k->end;
    }
    pthread_mutex_unlock(&lock);
    free(buffer);
}

// Named slots first, by time, longest first; empty slots last.
static int byTime(const void *a, const void *b) {
    const __typeof__(table[0]) *x = a, *y = b;
    if (!x->name || !y->name) return !x->name - !y->name;
    return x->ns < y->ns ? 1 : x->ns > y->ns ? -1 : 0;
}

static int byStart(const void *a, const void *b) {
    const struct span *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start ? 1 : 0;
}

// The union of the kernels' intervals, and the gaps between them by length.
static void coverage(void) {
    if (spanCount == 0) return;
    qsort(spans, spanCount, sizeof *spans, byStart);
    static const uint64_t bounds[] = {2000, 10000, 50000, 250000, 1000000};  // ns
    enum { BINS = sizeof bounds / sizeof bounds[0] + 1 };
    uint64_t busy = 0, gapNs[BINS] = {0}, gapCount[BINS] = {0};
    uint64_t s = spans[0].start, e = spans[0].end;
    for (size_t i = 1; i <= spanCount; i++) {
        if (i < spanCount && spans[i].start <= e) {
            if (spans[i].end > e) e = spans[i].end;
            continue;
        }
        busy += e - s;
        if (i == spanCount) break;
        uint64_t gap = spans[i].start - e;
        int b = 0;
        while (b < BINS - 1 && gap >= bounds[b]) b++;
        gapNs[b] += gap;
        gapCount[b]++;
        s = spans[i].start;
        e = spans[i].end;
    }
    fprintf(stderr, "kernel trace: some kernel running %.3f s of the span; gaps with none:\n", busy / 1e9);
    static const char *labels[] = {"< 2 us", "2-10 us", "10-50 us", "50-250 us", "0.25-1 ms", ">= 1 ms"};
    for (int b = 0; b < BINS; b++)
        if (gapCount[b]) fprintf(stderr, "  %-10s %9llu gaps %10.3f ms\n", labels[b], (unsigned long long)gapCount[b], gapNs[b] / 1e6);
}

static void report(void) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&lock);
    qsort(table, SLOTS, sizeof table[0], byTime);
    uint64_t total = 0;
    for (int i = 0; i < SLOTS; i++) total += table[i].ns;
    fprintf(stderr, "kernel trace: GPU busy %.3f s of a %.3f s span, %zu records dropped\n", total / 1e9,
            last > first ? (last - first) / 1e9 : 0.0, dropped);
    coverage();
    for (int i = 0; i < SLOTS && table[i].name; i++)
        fprintf(stderr, "%9.3f ms %5.1f%% %8llu calls %8.2f us  %.110s\n", table[i].ns / 1e6, 100.0 * table[i].ns / (total ? total : 1),
                (unsigned long long)table[i].calls, table[i].ns / 1e3 / table[i].calls, table[i].name);
    pthread_mutex_unlock(&lock);
}

int InitializeInjection(void) {
    if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) return 0;
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    atexit(report);
    return 1;
}
