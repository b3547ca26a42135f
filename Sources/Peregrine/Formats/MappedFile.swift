#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A read-only memory map of a whole file. Weights are used in place from the page cache, so a
/// model costs no copy to load and pages in lazily.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let size: Int
    public let base: UnsafeRawPointer?

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw PeregrineError.io("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw PeregrineError.io("cannot stat \(path): \(String(cString: strerror(errno)))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw PeregrineError.io("\(path) is not a regular file") }
        size = Int(st.st_size)
        if size == 0 {
            base = nil
            return
        }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else { throw PeregrineError.io("cannot map \(path): \(String(cString: strerror(errno)))") }
        base = UnsafeRawPointer(p)
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), size) }
    }
}

public enum FileSystem {
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Reads a whole file into memory (for small files such as JSON).
    public static func read(_ path: String) throws -> [UInt8] {
        let m = try MappedFile(path: path)
        return Array(m.bytes)
    }

    public static func readJSON(_ path: String) throws -> JSONValue {
        let m = try MappedFile(path: path)
        do { return try JSON.parse(m.bytes) } catch let e as JSONError {
            throw PeregrineError.format("\(path): \(e.description)")
        }
    }

    /// A model given as a single GGUF file rather than a Hugging Face directory: a file that
    /// begins with GGUF's magic, whatever its name, or a file named `.gguf` (whose header
    /// `GGUFFile` then checks, so a wrong one is reported as not a GGUF file).
    public static func isGGUFFile(_ path: String) -> Bool {
        guard exists(path), !isDirectory(path) else { return false }
        return path.hasSuffix(".gguf") || startsWithGGUFMagic(path)
    }

    /// Whether the file's first four bytes are "GGUF".
    static func startsWithGGUFMagic(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var magic: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
        let n = withUnsafeMutableBytes(of: &magic) { pread(fd, $0.baseAddress, 4, 0) }
        return n == 4 && magic == (0x47, 0x47, 0x55, 0x46)
    }

    public static func join(_ a: String, _ b: String) -> String {
        a.hasSuffix("/") ? a + b : a + "/" + b
    }
}
