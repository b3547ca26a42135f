import Foundation
import XCTest

/// The CUDA kernels on the CPU (Tests/KernelEmulator: Kernels.cu compiled as C++ over a host
/// emulation of threads, shared memory and the tensor-core instructions), against host
/// references, so their indexing and fragment layouts are checked on machines without a GPU.
/// Needs Linux (the emulator's fibers are declared with ELF directives) and a C++20 compiler
/// (CXX, or c++); without them the test is skipped.
final class KernelEmulatorTests: XCTestCase {
    func testKernelsOnTheEmulator() throws {
        #if !os(Linux)
        throw XCTSkip("the kernel emulator builds on Linux only")
        #endif
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("KernelEmulator/run.sh")
        let compiler = ProcessInfo.processInfo.environment["CXX"] ?? "c++"
        guard try run("/bin/sh", ["-c", "command -v \"$0\" > /dev/null", compiler]).status == 0 else {
            throw XCTSkip("no C++ compiler (\(compiler)) for the kernel emulator")
        }
        let (status, output) = try run("/bin/sh", [script.path])
        XCTAssertEqual(status, 0, "Tests/KernelEmulator/run.sh failed:\n" + output)
        XCTAssertTrue(output.contains("KernelEmulator: all tests passed"), output)
    }

    private func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
