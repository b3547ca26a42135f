#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file written front to back into `path.partial` and renamed to `path` by `finish()`; one
/// that is never finished (an error on the way) is removed, so a failure leaves nothing behind.
public final class OutputFile {
    public let path: String
    private let partial: String
    private var handle: UnsafeMutablePointer<FILE>?

    public init(path: String) throws {
        self.path = path
        partial = path + ".partial"
        guard let f = fopen(partial, "wb") else {
            throw PeregrineError.io("\(path): cannot create the file (\(String(cString: strerror(errno))))")
        }
        handle = f
    }

    deinit {
        if let handle {
            fclose(handle)
            unlink(partial)
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard let handle else { throw PeregrineError.io("\(path): written after it was finished") }
        guard bytes.isEmpty || fwrite(bytes.baseAddress!, 1, bytes.count, handle) == bytes.count else {
            throw PeregrineError.io("\(path): write failed (\(String(cString: strerror(errno))))")
        }
    }

    public func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }

    /// Values in their in-memory (little-endian) layout.
    public func write<T>(_ values: UnsafeBufferPointer<T>) throws { try write(UnsafeRawBufferPointer(values)) }

    /// Flushes the file and moves it to `path`.
    public func finish() throws {
        guard let h = handle else { return }
        handle = nil
        let flushed = fflush(h) == 0
        fclose(h)
        guard flushed else {
            unlink(partial)
            throw PeregrineError.io("\(path): write failed (\(String(cString: strerror(errno))))")
        }
        guard rename(partial, path) == 0 else {
            unlink(partial)
            throw PeregrineError.io("\(path): cannot rename into place (\(String(cString: strerror(errno))))")
        }
    }
}

/// Bounds-checked little-endian reads from a byte buffer (a mapped file), each failure one
/// `PeregrineError.format` naming the file and the offset.
struct BinaryReader {
    let bytes: UnsafeRawBufferPointer
    let what: String
    var pos = 0

    init(_ bytes: UnsafeRawBufferPointer, what: String) {
        self.bytes = bytes
        self.what = what
    }

    var remaining: Int { bytes.count - pos }

    func error(_ m: String) -> PeregrineError { .format("\(what): \(m)") }

    mutating func take(_ n: Int) throws -> Int {
        guard n >= 0, n <= remaining else { throw error("truncated at byte \(pos) (\(n) more bytes expected)") }
        defer { pos += n }
        return pos
    }

    mutating func u8() throws -> UInt8 { bytes[try take(1)] }
    mutating func u16() throws -> UInt16 { UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(2), as: UInt16.self)) }
    mutating func i32() throws -> Int32 { Int32(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(4), as: Int32.self)) }
    mutating func u32() throws -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(4), as: UInt32.self)) }
    mutating func u64() throws -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: try take(8), as: UInt64.self)) }

    mutating func floats(_ n: Int) throws -> [Float] {
        guard n >= 0, n <= remaining / 4 else { throw error("truncated at byte \(pos) (\(n) values expected)") }
        let start = try take(4 * n)
        return (0..<n).map { Float(bitPattern: UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: start + 4 * $0, as: UInt32.self))) }
    }

    mutating func string(_ n: Int) throws -> String {
        let start = try take(n)
        return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<(start + n)]), as: UTF8.self)
    }
}
