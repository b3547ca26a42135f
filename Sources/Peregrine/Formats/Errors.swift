/// Every failure a user can cause (a bad file, a bad flag, an oversize prompt) surfaces as one of
/// these, with a message meant to be printed as a single line.
public enum PeregrineError: Error, CustomStringConvertible, Equatable {
    case io(String)
    case format(String)
    case unsupported(String)
    case invalidArgument(String)
    case backend(String)

    public var description: String {
        switch self {
        case .io(let m), .format(let m), .unsupported(let m), .invalidArgument(let m), .backend(let m): return m
        }
    }
}
