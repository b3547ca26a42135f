// swift-tools-version:6.0
import PackageDescription

// Haswell is the portable AVX2/FMA/F16C baseline; wider paths are chosen at run time.
let cpuFlags: [SwiftSetting] = [.unsafeFlags(["-target-cpu", "haswell"], .when(platforms: [.linux]))]

let package = Package(
    name: "Peregrine",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "Peregrine", targets: ["Peregrine"]),
        .library(name: "PeregrineServer", targets: ["PeregrineServer"]),
        .executable(name: "peregrine", targets: ["PeregrineCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.2.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // Integer kernels for quantized weights, generic over the multiply-accumulate instruction.
        // The Builtin module gives the row-group kernels a prefetch (clang's _mm_prefetch is a
        // macro Swift cannot call).
        .target(
            name: "PeregrineInt8",
            swiftSettings: cpuFlags + [.unsafeFlags(["-O"], .when(configuration: .debug)),
                                       .enableExperimentalFeature("BuiltinModule")]
        ),
        // The same kernels specialized for AVX-512 VNNI, built for a CPU that has it (cascadelake);
        // Peregrine calls them only where /proc/cpuinfo shows avx512_vnni. VNNI's intrinsics are
        // macros in clang's headers, which Swift does not import, so they are reached through
        // LLVM's own intrinsic in the Builtin module.
        .target(
            name: "PeregrineVNNI",
            dependencies: ["PeregrineInt8"],
            swiftSettings: [.unsafeFlags(["-target-cpu", "cascadelake"], .when(platforms: [.linux])),
                            .unsafeFlags(["-O"], .when(configuration: .debug)),
                            .enableExperimentalFeature("BuiltinModule")]
        ),
        // Floating-point products on AVX-512's 32 registers, built for cascadelake; Peregrine
        // calls them only where /proc/cpuinfo shows AVX-512. F16 widening goes through LLVM's
        // vector fpext in the Builtin module (one vcvtph2ps per 16 values).
        .target(
            name: "PeregrineAVX512",
            swiftSettings: [.unsafeFlags(["-target-cpu", "cascadelake"], .when(platforms: [.linux])),
                            .unsafeFlags(["-O"], .when(configuration: .debug)),
                            .enableExperimentalFeature("BuiltinModule")]
        ),
        // AVX-512 BF16's pair dot product as one inline C function: Swift cannot name the
        // intrinsic's bfloat operands (the header says more).
        .target(name: "CPeregrineBF16"),
        // BF16 products on `vdpbf16ps`, built for a CPU that has AVX-512 BF16 (cooperlake);
        // Peregrine calls them only where /proc/cpuinfo shows avx512_bf16.
        .target(
            name: "PeregrineBF16",
            dependencies: ["CPeregrineBF16", "PeregrineAVX512"],
            swiftSettings: [.unsafeFlags(["-target-cpu", "cooperlake"], .when(platforms: [.linux])),
                            .unsafeFlags(["-O"], .when(configuration: .debug))]
        ),
        .target(
            name: "Peregrine",
            dependencies: ["PeregrineInt8", "PeregrineVNNI", "PeregrineAVX512", "PeregrineBF16", .product(name: "Atomics", package: "swift-atomics")],
            // The CUDA kernels travel inside the library and are compiled by NVRTC at run time.
            resources: [.embedInCode("Backend/CUDA/Kernels.cu")],
            // Kernels unoptimised are ~50x slower; the test suite runs real models, so the
            // library is optimised in debug builds too. The Builtin module gives the thread pool
            // the x86 `pause` instruction (clang's _mm_pause is a header inline Swift cannot call).
            swiftSettings: cpuFlags + [.unsafeFlags(["-O"], .when(configuration: .debug)),
                                       .enableExperimentalFeature("BuiltinModule")]
        ),
        // The OpenAI-compatible HTTP front end (`peregrine serve`).
        .target(
            name: "PeregrineServer",
            dependencies: ["Peregrine",
                           .product(name: "Hummingbird", package: "hummingbird"),
                           .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "ServiceLifecycle", package: "swift-service-lifecycle")],
            swiftSettings: cpuFlags
        ),
        .executableTarget(
            name: "PeregrineCLI",
            dependencies: ["Peregrine", "PeregrineServer", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: cpuFlags
        ),
        .testTarget(
            name: "PeregrineTests",
            dependencies: ["Peregrine"],
            swiftSettings: cpuFlags
        ),
        .testTarget(
            name: "PeregrineServerTests",
            dependencies: ["PeregrineServer", "Peregrine", .product(name: "Logging", package: "swift-log")],
            swiftSettings: cpuFlags
        ),
    ],
    swiftLanguageModes: [.v5]
)
