/// Projections that a family stores fused, one matrix holding several under one another (Phi-3's
/// q/k/v in `qkv_proj`, gate and up in `gate_up_proj`), presented under the separate names the
/// shared layers load: each part is a view of its rows of the stored matrix, no copy. The backends
/// then run the parts as they run separately stored projections, fused products included. A
/// source that stores the parts separately passes through.
final class FusedProjections: WeightSource {
    /// One fused matrix: its name, its columns, and its parts from the top, by name and rows.
    struct Layout {
        let fused: String
        let columns: Int
        let parts: [(name: String, rows: Int)]
    }

    let base: WeightSource
    private var parts: [String: (fused: String, rows: Range<Int>)] = [:]

    /// Checks each fused matrix's shape against its parts; throws when a matrix is missing and its
    /// parts are not all stored separately, or when its shape is not the parts' together.
    init(_ base: WeightSource, _ layouts: [Layout]) throws {
        self.base = base
        for l in layouts {
            // Every part stored under its own name: nothing to split. (A GGUF name may be shared:
            // llama.cpp calls Phi-3's fused gate/up `ffn_up`, Llama's up alone; its gate is absent.)
            if l.parts.allSatisfy({ base.contains($0.name) }) { continue }
            let total = l.parts.reduce(0) { $0 + $1.rows }
            let t = try base.require(l.fused, shape: [total, l.columns])
            var row = 0
            for p in l.parts {
                guard t.rows(row..<(row + p.rows), name: p.name) != nil else {
                    throw PeregrineError.format("tensor '\(base.storedName(l.fused))' of type \(t.dtype.rawValue) cannot be split into rows")
                }
                parts[p.name] = (l.fused, row..<(row + p.rows))
                row += p.rows
            }
        }
    }

    func tensor(_ name: String) -> TensorView? {
        guard let p = parts[name] else { return base.tensor(name) }
        return base.tensor(p.fused)?.rows(p.rows, name: storedName(name))
    }

    func storedName(_ name: String) -> String {
        guard let p = parts[name] else { return base.storedName(name) }
        return "\(base.storedName(p.fused)) rows \(p.rows.lowerBound)..<\(p.rows.upperBound)"
    }

    func missingReason(_ name: String) -> String {
        guard let p = parts[name] else { return base.missingReason(name) }
        return base.missingReason(p.fused)
    }

    func contains(_ name: String) -> Bool { parts[name] != nil || base.contains(name) }
}
