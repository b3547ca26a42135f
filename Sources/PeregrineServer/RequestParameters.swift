import Peregrine

/// Typed reads of a request's JSON fields. Every failure names the parameter; a field that is
/// absent or null reads as nil (OpenAI's clients send null for parameters left unset).
struct RequestParameters {
    let object: JSONObject

    init(_ value: JSONValue) throws {
        guard let o = value.object else { throw APIError.invalid("The request body must be a JSON object.") }
        object = o
    }

    func value(_ key: String) -> JSONValue? {
        guard let v = object[key], !v.isNull else { return nil }
        return v
    }

    func string(_ key: String) throws -> String? {
        guard let v = value(key) else { return nil }
        guard let s = v.string else { throw APIError.wrongType(key, "a string") }
        return s
    }

    func bool(_ key: String) throws -> Bool? {
        guard let v = value(key) else { return nil }
        guard let b = v.bool else { throw APIError.wrongType(key, "a boolean") }
        return b
    }

    func int(_ key: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let v = value(key) else { return nil }
        return try Self.int(v, key, in: range)
    }

    static func int(_ v: JSONValue, _ key: String, in range: ClosedRange<Int>) throws -> Int {
        guard let d = v.double else { throw APIError.wrongType(key, "an integer") }
        guard d.isFinite, d.rounded() == d else { throw APIError.wrongType(key, "an integer") }
        // Compared as doubles first, so a huge value cannot overflow the conversion.
        guard d >= Double(range.lowerBound), d <= Double(range.upperBound) else {
            throw APIError.outOfRange(key, Self.describe(range))
        }
        return Int(d)
    }

    /// A number that must lie in a range; `open` excludes the lower bound.
    func float(_ key: String, in range: ClosedRange<Double>, openBelow: Bool = false, openAbove: Bool = false) throws -> Float? {
        guard let v = value(key) else { return nil }
        guard let d = v.double else { throw APIError.wrongType(key, "a number") }
        let low = openBelow ? d > range.lowerBound : d >= range.lowerBound
        let high = openAbove ? d < range.upperBound : d <= range.upperBound
        guard d.isFinite, low, high else {
            throw APIError.outOfRange(key, "\(openBelow ? "greater than" : "at least") \(Self.number(range.lowerBound)) and \(openAbove ? "less than" : "at most") \(Self.number(range.upperBound))")
        }
        return Float(d)
    }

    /// A string or a list of strings (`stop`).
    func strings(_ key: String, maxCount: Int) throws -> [String]? {
        guard let v = value(key) else { return nil }
        if let s = v.string { return [s] }
        guard let a = v.array else { throw APIError.wrongType(key, "a string or a list of strings") }
        guard a.count <= maxCount else { throw APIError.outOfRange(key, "a list of at most \(maxCount) strings") }
        return try a.map {
            guard let s = $0.string else { throw APIError.wrongType(key, "a string or a list of strings") }
            return s
        }
    }

    func ints(_ key: String, maxCount: Int, in range: ClosedRange<Int>) throws -> [Int]? {
        guard let v = value(key) else { return nil }
        guard let a = v.array else { throw APIError.wrongType(key, "a list of integers") }
        guard a.count <= maxCount else { throw APIError.outOfRange(key, "a list of at most \(maxCount) integers") }
        return try a.map { try Self.int($0, key, in: range) }
    }

    static func describe(_ range: ClosedRange<Int>) -> String {
        if range.upperBound >= Int(Int32.max) { return "at least \(range.lowerBound)" }
        return "between \(range.lowerBound) and \(range.upperBound)"
    }

    static func number(_ d: Double) -> String {
        d.rounded() == d && abs(d) < 1e15 ? String(Int(d)) : String(d)
    }
}
