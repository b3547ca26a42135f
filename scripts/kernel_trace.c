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
// time, and the span from the first kernel's start to the last one's end.
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

static void report(void) {
    cuptiActivityFlushAll(1);
    pthread_mutex_lock(&lock);
    qsort(table, SLOTS, sizeof table[0], byTime);
    uint64_t total = 0;
    for (int i = 0; i < SLOTS; i++) total += table[i].ns;
    fprintf(stderr, "kernel trace: GPU busy %.3f s of a %.3f s span, %zu records dropped\n", total / 1e9,
            last > first ? (last - first) / 1e9 : 0.0, dropped);
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
