#!/usr/bin/env bash
# Runs the GPU tests (CUDABackendTests) on a GPU machine that has no Swift toolchain.
#   bash scripts/gpu_tests.sh pack TESTS.tar.xz   # where Swift is: the test bundle and the Swift runtime it links
#   bash scripts/gpu_tests.sh run TESTS.tar.xz    # on the GPU machine, in a checkout with models/ and Tests/Fixtures/
# The bundle finds its fixtures by the path of the checkout it was built in; `run` links that
# path to this checkout when they differ. CONFIG=debug packs the debug build (quicker to build,
# slower host code; the kernels are the same). TESTS picks the XCTest filter (CUDABackendTests).
# TARGET=DIR links DIR as models/target where the checkout lacks the shipped model (a machine that
# received it in a transfer of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
pack)
    config=${CONFIG:-release}
    if [ "$config" = release ]; then swift build --build-tests -c release -Xswiftc -enable-testing; else swift build --build-tests; fi
    dir=$(mktemp -d)
    mkdir -p "$dir/gputest/lib"
    cp ".build/$config/PeregrinePackageTests.xctest" "$dir/gputest/"
    strip --strip-debug "$dir/gputest/PeregrinePackageTests.xctest"
    for lib in $(ldd ".build/$config/PeregrinePackageTests.xctest" | awk '/swift/ { print $3 }'); do cp "$lib" "$dir/gputest/lib/"; done
    pwd > "$dir/gputest/checkout"
    tar -C "$dir" -cf - gputest | xz -T0 -6 > "$2"
    rm -rf "$dir"
    ;;
run)
    dir=$(mktemp -d)
    if command -v xz > /dev/null; then xz -dc "$2" | tar -C "$dir" -xf -; else
        python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])" "$2" "$dir"; fi
    built=$(cat "$dir/gputest/checkout")
    if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")"; ln -s "$PWD" "$built"; fi
    if [ -n "${TARGET:-}" ] && [ ! -f models/target/config.json ]; then
        mkdir -p models && rm -rf models/target && ln -s "$(cd "$TARGET" && pwd)" models/target
    fi
    export LD_LIBRARY_PATH="$dir/gputest/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    "$dir/gputest/PeregrinePackageTests.xctest" "PeregrineTests.${TESTS:-CUDABackendTests}"
    ;;
*)
    echo "usage: $0 pack|run TESTS.tar.xz" >&2
    exit 2
    ;;
esac
