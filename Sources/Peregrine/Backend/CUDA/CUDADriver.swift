#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// The CUDA driver API, NVRTC and cuBLAS, opened at run time with dlopen: nothing CUDA is needed
/// to build Peregrine, and on a machine without a GPU `CUDADriver.shared` says why not. Every
/// call's status becomes a Swift error naming the call.
public final class CUDADriver: @unchecked Sendable {
    public typealias Result = Int32
    public typealias DevicePointer = UInt64

    // Driver API.
    let cuInit: @convention(c) (UInt32) -> Result
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Result
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> Result
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> Result
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32) -> Result
    let cuCtxSetCurrent: @convention(c) (OpaquePointer?) -> Result
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<DevicePointer>, Int) -> Result
    let cuMemGetInfo: @convention(c) (UnsafeMutablePointer<Int>, UnsafeMutablePointer<Int>) -> Result
    let cuMemFree: @convention(c) (DevicePointer) -> Result
    let cuMemcpyHtoDAsync: @convention(c) (DevicePointer, UnsafeRawPointer, Int, OpaquePointer?) -> Result
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer, DevicePointer, Int, OpaquePointer?) -> Result
    let cuMemcpyDtoDAsync: @convention(c) (DevicePointer, DevicePointer, Int, OpaquePointer?) -> Result
    let cuMemsetD8Async: @convention(c) (DevicePointer, UInt8, Int, OpaquePointer?) -> Result
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafeRawPointer) -> Result
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UnsafePointer<CChar>) -> Result
    let cuLaunchKernel: @convention(c) (OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, OpaquePointer?,
                                        UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Result
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Result
    let cuStreamSynchronize: @convention(c) (OpaquePointer?) -> Result
    let cuGetErrorName: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result
    let cuMemAllocHost: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>, Int) -> Result
    /// Events (chained decode steps only); nil where the driver lacks them, which turns chaining off.
    typealias EventCreate = @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Result
    typealias EventCall = @convention(c) (OpaquePointer?) -> Result
    typealias EventRecord = @convention(c) (OpaquePointer?, OpaquePointer?) -> Result
    let cuEventCreate: EventCreate?
    let cuEventRecord: EventRecord?
    let cuEventSynchronize: EventCall?
    let cuEventDestroy: EventCall?
    let cuStreamBeginCapture: @convention(c) (OpaquePointer?, UInt32) -> Result
    let cuStreamEndCapture: @convention(c) (OpaquePointer?, UnsafeMutablePointer<OpaquePointer?>) -> Result
    let cuGraphInstantiate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UInt64) -> Result
    let cuGraphLaunch: @convention(c) (OpaquePointer?, OpaquePointer?) -> Result
    let cuGraphDestroy: @convention(c) (OpaquePointer?) -> Result
    let cuGraphExecDestroy: @convention(c) (OpaquePointer?) -> Result
    let cuFuncSetAttribute: @convention(c) (OpaquePointer?, Int32, Int32) -> Result
    /// cuLaunchKernelEx (CUDA 12 and later), for programmatic dependent launches; nil on older drivers.
    typealias LaunchKernelEx = @convention(c) (UnsafeRawPointer, OpaquePointer?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
                                               UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Result
    let cuLaunchKernelEx: LaunchKernelEx?
    /// cuTensorMapEncodeTiled (CUDA 12 and later): a tensor map for the TMA's copies (quant_gemm_ws
    /// takes one of its activations); nil on older drivers.
    typealias TensorMapEncodeTiled = @convention(c) (UnsafeMutableRawPointer, Int32, UInt32, UnsafeMutableRawPointer?, UnsafePointer<UInt64>,
                                                     UnsafePointer<UInt64>, UnsafePointer<UInt32>, UnsafePointer<UInt32>, Int32, Int32, Int32,
                                                     Int32) -> Result
    let cuTensorMapEncodeTiled: TensorMapEncodeTiled?

    // NVRTC.
    let nvrtcCreateProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafePointer<CChar>, UnsafePointer<CChar>?, Int32,
                                            UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let nvrtcCompileProgram: @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let nvrtcGetProgramLogSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let nvrtcGetProgramLog: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let nvrtcGetCUBINSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let nvrtcGetCUBIN: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let nvrtcDestroyProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32

    // cuBLAS (for prefill products).
    let cublasCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    let cublasSetStream: @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32
    let cublasGemmEx: @convention(c) (OpaquePointer?, Int32, Int32, Int32, Int32, Int32, UnsafeRawPointer, UnsafeRawPointer?, Int32, Int32,
                                      UnsafeRawPointer?, Int32, Int32, UnsafeRawPointer, UnsafeMutableRawPointer?, Int32, Int32, Int32, Int32) -> Int32

    public let deviceName: String
    /// The device reads pinned host memory at its host address (kernels may read staged inputs in place).
    let unifiedAddressing: Bool
    public let computeCapability: (major: Int, minor: Int)
    public let multiprocessors: Int
    /// Shared memory a block may have when a kernel asks for it (cuFuncSetAttribute).
    public let maxSharedPerBlock: Int
    let context: OpaquePointer?

    /// The driver on this machine, or the reason there is none.
    public static let shared: Swift.Result<CUDADriver, PeregrineError> = {
        do { return .success(try CUDADriver()) } catch let e as PeregrineError { return .failure(e) } catch {
            return .failure(.backend("\(error)"))
        }
    }()

    private static func open(_ names: [String]) throws -> UnsafeMutableRawPointer {
        let dirs = ["", "/usr/local/cuda/lib64/", "/usr/local/nvidia/lib64/", "/usr/lib/x86_64-linux-gnu/"]
        for name in names {
            for dir in dirs {
                if let h = dlopen(dir + name, RTLD_NOW | RTLD_GLOBAL) { return h }
            }
        }
        throw PeregrineError.backend("CUDA is not available: cannot open \(names[0]) (an NVIDIA driver and CUDA's lib64 folder on LD_LIBRARY_PATH are needed)")
    }

    private static func symbol<T>(_ lib: UnsafeMutableRawPointer, _ names: [String], as: T.Type) throws -> T {
        for name in names {
            if let p = dlsym(lib, name) { return unsafeBitCast(p, to: T.self) }
        }
        throw PeregrineError.backend("CUDA library lacks \(names[0])")
    }

    private init() throws {
        let cuda = try CUDADriver.open(["libcuda.so.1", "libcuda.so"])
        let nvrtc = try CUDADriver.open(["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"])
        let cublas = try CUDADriver.open(["libcublas.so", "libcublas.so.13", "libcublas.so.12"])
        cuInit = try CUDADriver.symbol(cuda, ["cuInit"], as: type(of: cuInit))
        cuDeviceGet = try CUDADriver.symbol(cuda, ["cuDeviceGet"], as: type(of: cuDeviceGet))
        cuDeviceGetName = try CUDADriver.symbol(cuda, ["cuDeviceGetName"], as: type(of: cuDeviceGetName))
        cuDeviceGetAttribute = try CUDADriver.symbol(cuda, ["cuDeviceGetAttribute"], as: type(of: cuDeviceGetAttribute))
        cuDevicePrimaryCtxRetain = try CUDADriver.symbol(cuda, ["cuDevicePrimaryCtxRetain"], as: type(of: cuDevicePrimaryCtxRetain))
        cuCtxSetCurrent = try CUDADriver.symbol(cuda, ["cuCtxSetCurrent"], as: type(of: cuCtxSetCurrent))
        cuMemAlloc = try CUDADriver.symbol(cuda, ["cuMemAlloc_v2"], as: type(of: cuMemAlloc))
        cuMemGetInfo = try CUDADriver.symbol(cuda, ["cuMemGetInfo_v2"], as: type(of: cuMemGetInfo))
        cuMemFree = try CUDADriver.symbol(cuda, ["cuMemFree_v2"], as: type(of: cuMemFree))
        cuMemcpyHtoDAsync = try CUDADriver.symbol(cuda, ["cuMemcpyHtoDAsync_v2"], as: type(of: cuMemcpyHtoDAsync))
        cuMemcpyDtoHAsync = try CUDADriver.symbol(cuda, ["cuMemcpyDtoHAsync_v2"], as: type(of: cuMemcpyDtoHAsync))
        cuMemcpyDtoDAsync = try CUDADriver.symbol(cuda, ["cuMemcpyDtoDAsync_v2"], as: type(of: cuMemcpyDtoDAsync))
        cuMemsetD8Async = try CUDADriver.symbol(cuda, ["cuMemsetD8Async"], as: type(of: cuMemsetD8Async))
        cuModuleLoadData = try CUDADriver.symbol(cuda, ["cuModuleLoadData"], as: type(of: cuModuleLoadData))
        cuModuleGetFunction = try CUDADriver.symbol(cuda, ["cuModuleGetFunction"], as: type(of: cuModuleGetFunction))
        cuLaunchKernel = try CUDADriver.symbol(cuda, ["cuLaunchKernel"], as: type(of: cuLaunchKernel))
        cuStreamCreate = try CUDADriver.symbol(cuda, ["cuStreamCreate"], as: type(of: cuStreamCreate))
        cuStreamSynchronize = try CUDADriver.symbol(cuda, ["cuStreamSynchronize"], as: type(of: cuStreamSynchronize))
        cuGetErrorName = try CUDADriver.symbol(cuda, ["cuGetErrorName"], as: type(of: cuGetErrorName))
        cuMemAllocHost = try CUDADriver.symbol(cuda, ["cuMemAllocHost_v2"], as: type(of: cuMemAllocHost))
        cuEventCreate = try? CUDADriver.symbol(cuda, ["cuEventCreate"], as: EventCreate.self)
        cuEventRecord = try? CUDADriver.symbol(cuda, ["cuEventRecord"], as: EventRecord.self)
        cuEventSynchronize = try? CUDADriver.symbol(cuda, ["cuEventSynchronize"], as: EventCall.self)
        cuEventDestroy = try? CUDADriver.symbol(cuda, ["cuEventDestroy_v2", "cuEventDestroy"], as: EventCall.self)
        cuStreamBeginCapture = try CUDADriver.symbol(cuda, ["cuStreamBeginCapture_v2"], as: type(of: cuStreamBeginCapture))
        cuStreamEndCapture = try CUDADriver.symbol(cuda, ["cuStreamEndCapture"], as: type(of: cuStreamEndCapture))
        cuGraphInstantiate = try CUDADriver.symbol(cuda, ["cuGraphInstantiateWithFlags"], as: type(of: cuGraphInstantiate))
        cuGraphLaunch = try CUDADriver.symbol(cuda, ["cuGraphLaunch"], as: type(of: cuGraphLaunch))
        cuGraphDestroy = try CUDADriver.symbol(cuda, ["cuGraphDestroy"], as: type(of: cuGraphDestroy))
        cuGraphExecDestroy = try CUDADriver.symbol(cuda, ["cuGraphExecDestroy"], as: type(of: cuGraphExecDestroy))
        cuFuncSetAttribute = try CUDADriver.symbol(cuda, ["cuFuncSetAttribute"], as: type(of: cuFuncSetAttribute))
        cuLaunchKernelEx = dlsym(cuda, "cuLaunchKernelEx").map { unsafeBitCast($0, to: LaunchKernelEx.self) }
        cuTensorMapEncodeTiled = dlsym(cuda, "cuTensorMapEncodeTiled").map { unsafeBitCast($0, to: TensorMapEncodeTiled.self) }
        nvrtcCreateProgram = try CUDADriver.symbol(nvrtc, ["nvrtcCreateProgram"], as: type(of: nvrtcCreateProgram))
        nvrtcCompileProgram = try CUDADriver.symbol(nvrtc, ["nvrtcCompileProgram"], as: type(of: nvrtcCompileProgram))
        nvrtcGetProgramLogSize = try CUDADriver.symbol(nvrtc, ["nvrtcGetProgramLogSize"], as: type(of: nvrtcGetProgramLogSize))
        nvrtcGetProgramLog = try CUDADriver.symbol(nvrtc, ["nvrtcGetProgramLog"], as: type(of: nvrtcGetProgramLog))
        nvrtcGetCUBINSize = try CUDADriver.symbol(nvrtc, ["nvrtcGetCUBINSize"], as: type(of: nvrtcGetCUBINSize))
        nvrtcGetCUBIN = try CUDADriver.symbol(nvrtc, ["nvrtcGetCUBIN"], as: type(of: nvrtcGetCUBIN))
        nvrtcDestroyProgram = try CUDADriver.symbol(nvrtc, ["nvrtcDestroyProgram"], as: type(of: nvrtcDestroyProgram))
        cublasCreate = try CUDADriver.symbol(cublas, ["cublasCreate_v2"], as: type(of: cublasCreate))
        cublasSetStream = try CUDADriver.symbol(cublas, ["cublasSetStream_v2"], as: type(of: cublasSetStream))
        cublasGemmEx = try CUDADriver.symbol(cublas, ["cublasGemmEx"], as: type(of: cublasGemmEx))

        let initStatus = cuInit(0)
        guard initStatus == 0 else { throw PeregrineError.backend("no CUDA device: cuInit failed (\(CUDADriver.name(of: initStatus, cuGetErrorName)))") }
        var device: Int32 = 0
        try CUDADriver.check(cuDeviceGet(&device, 0), "cuDeviceGet", cuGetErrorName)
        var name = [CChar](repeating: 0, count: 256)
        try CUDADriver.check(cuDeviceGetName(&name, 256, device), "cuDeviceGetName", cuGetErrorName)
        deviceName = String(cString: name)
        var major: Int32 = 0, minor: Int32 = 0, sms: Int32 = 0, shared: Int32 = 0
        try CUDADriver.check(cuDeviceGetAttribute(&major, 75, device), "cuDeviceGetAttribute", cuGetErrorName)
        try CUDADriver.check(cuDeviceGetAttribute(&minor, 76, device), "cuDeviceGetAttribute", cuGetErrorName)
        try CUDADriver.check(cuDeviceGetAttribute(&sms, 16, device), "cuDeviceGetAttribute", cuGetErrorName)
        // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        try CUDADriver.check(cuDeviceGetAttribute(&shared, 97, device), "cuDeviceGetAttribute", cuGetErrorName)
        // CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: pinned host memory has one address on host and device.
        var unified: Int32 = 0
        unifiedAddressing = cuDeviceGetAttribute(&unified, 41, device) == 0 && unified != 0
        computeCapability = (Int(major), Int(minor))
        multiprocessors = Int(sms)
        maxSharedPerBlock = Int(shared)
        var ctx: OpaquePointer?
        try CUDADriver.check(cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain", cuGetErrorName)
        try CUDADriver.check(cuCtxSetCurrent(ctx), "cuCtxSetCurrent", cuGetErrorName)
        context = ctx
    }

    static func name(of status: Result, _ getName: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result) -> String {
        var p: UnsafePointer<CChar>?
        _ = getName(status, &p)
        return p.map { String(cString: $0) } ?? "CUDA error \(status)"
    }

    static func check(_ status: Result, _ call: String,
                      _ getName: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result) throws {
        guard status == 0 else { throw PeregrineError.backend("\(call) failed: \(name(of: status, getName))") }
    }

    func check(_ status: Result, _ call: String) throws { try CUDADriver.check(status, call, cuGetErrorName) }

    /// Makes the shared context current on the calling thread.
    func makeCurrent() throws { try check(cuCtxSetCurrent(context), "cuCtxSetCurrent") }

    /// Compiles CUDA C for this device with NVRTC, or loads the cubin cached on disk for the same
    /// source and architecture.
    func compile(_ source: String, name: String, defines: [String] = []) throws -> OpaquePointer? {
        // Hopper (9.0) compiles for sm_90a, whose arch-specific instructions (wgmma) some kernels use.
        let arch = "sm_\(computeCapability.major)\(computeCapability.minor)" + (computeCapability == (9, 0) ? "a" : "")
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in (source + arch + defines.joined(separator: " ")).utf8 { hash = (hash ^ UInt64(b)) &* 0x100_0000_01b3 }
        let cacheDir = (ProcessInfo.processInfo.environment["XDG_CACHE_HOME"] ?? (NSHomeDirectory() + "/.cache")) + "/peregrine"
        let cachePath = cacheDir + "/\(name)-\(arch)-\(String(hash, radix: 16)).cubin"
        var image: [UInt8]
        if let cached = FileManager.default.contents(atPath: cachePath) {
            image = [UInt8](cached)
        } else {
            var program: OpaquePointer?
            let rc = nvrtcCreateProgram(&program, source, name + ".cu", 0, nil, nil)
            guard rc == 0 else { throw PeregrineError.backend("nvrtcCreateProgram failed (\(rc))") }
            defer { _ = nvrtcDestroyProgram(&program) }
            var options = ["--gpu-architecture=\(arch)", "--std=c++17", "-default-device", "--use_fast_math"] + defines.map { "-D" + $0 }
            // NVRTC carries the fp16/bf16 headers in recent versions; older ones need CUDA's include folder.
            for dir in ["/usr/local/cuda/include"] where FileManager.default.fileExists(atPath: dir) { options.append("-I" + dir) }
            let cOptions = options.map { strdup($0) }
            defer { cOptions.forEach { free($0) } }
            let status = cOptions.map { UnsafePointer($0) }.withUnsafeBufferPointer {
                nvrtcCompileProgram(program, Int32(options.count), $0.baseAddress)
            }
            if status != 0 {
                var size = 0
                _ = nvrtcGetProgramLogSize(program, &size)
                var log = [CChar](repeating: 0, count: size + 1)
                _ = nvrtcGetProgramLog(program, &log)
                throw PeregrineError.backend("NVRTC could not compile \(name).cu for \(arch):\n\(String(cString: log))")
            }
            var size = 0
            _ = nvrtcGetCUBINSize(program, &size)
            image = [UInt8](repeating: 0, count: size)
            _ = image.withUnsafeMutableBufferPointer { $0.withMemoryRebound(to: CChar.self) { nvrtcGetCUBIN(program, $0.baseAddress!) } }
            try? FileManager.default.createDirectory(atPath: cacheDir, withIntermediateDirectories: true)
            // A cache that cannot be written only costs the next run a compile.
            _ = FileManager.default.createFile(atPath: cachePath, contents: Data(image))
        }
        var module: OpaquePointer?
        try image.withUnsafeBytes { try check(cuModuleLoadData(&module, $0.baseAddress!), "cuModuleLoadData") }
        return module
    }
}
