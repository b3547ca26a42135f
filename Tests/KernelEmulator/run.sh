#!/bin/sh
# Builds and runs the kernel emulator's tests (Kernels.cu's kernels on the CPU against host
# references), failing at the first failure. CXX picks the compiler, TESTS the tests (names of
# test_*.cpp without the extension), BUILD where the binaries go (a temporary directory otherwise),
# EMU_THREADS how many OS threads run a launch's blocks.
set -e
cd "$(dirname "$0")"
CXX=${CXX:-c++}
if [ -z "$BUILD" ]; then
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
fi
# CUDA code reinterprets memory through pointer casts (a pair of 16-bit values as an unsigned).
FLAGS="-std=c++20 -O2 -fno-strict-aliasing -Wno-unknown-pragmas"
# GCC notes that passing a 64-byte-aligned struct by value (a tensor map) changed ABI in GCC 4.6.
case "$($CXX --version 2>/dev/null)" in *clang*) FLAGS="$FLAGS -Wno-pass-failed" ;; *) FLAGS="$FLAGS -Wno-psabi" ;; esac
TESTS=${TESTS:-$(ls test_*.cpp | sed 's/\.cpp$//')}
# Each test includes all of Kernels.cu: build them in parallel, then run them in order.
pids=""
for t in $TESTS; do
    $CXX $FLAGS "$t.cpp" -o "$BUILD/$t" -lpthread &
    pids="$pids $!"
done
failed=0
for p in $pids; do wait "$p" || failed=1; done
[ "$failed" = 0 ] || { echo "KernelEmulator: a test did not build"; exit 1; }
# Blocks of a launch run on up to EMU_THREADS OS threads (1: one after another, in order).
if [ -z "$EMU_THREADS" ]; then
    EMU_THREADS=$(nproc 2>/dev/null || echo 1)
    [ "$EMU_THREADS" -le 8 ] || EMU_THREADS=8
fi
export EMU_THREADS
for t in $TESTS; do
    echo "== $t"
    "$BUILD/$t"
done
echo "KernelEmulator: all tests passed"
