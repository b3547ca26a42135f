import Atomics
#if canImport(Glibc)
import Glibc
#endif
#if arch(x86_64)
import Builtin
#endif

/// A persistent pool of worker threads for data-parallel loops. The calling thread takes part, so a
/// pool of N threads starts N - 1 workers. Workers spin briefly after each job (the next kernel of
/// a forward pass usually follows within microseconds) and then sleep on a condition variable.
public final class ThreadPool: @unchecked Sendable {
    public let threadCount: Int

    private var mutex = pthread_mutex_t()
    private var wake = pthread_cond_t()
    private let generation = ManagedAtomic<Int>(0)
    private let nextTask = ManagedAtomic<Int>(0)
    private let remaining = ManagedAtomic<Int>(0)
    private let active = ManagedAtomic<Int>(0)
    /// Points at the caller's closure while a job runs (it lives on the caller's stack).
    private var job: UnsafeRawPointer?
    private var taskCount = 0
    private var shuttingDown = false
    private var threads: [pthread_t] = []

    public static let shared = ThreadPool(threadCount: ThreadPool.defaultThreadCount)

    public static var defaultThreadCount: Int {
        if let s = getenv("PEREGRINE_THREADS"), let n = Int(String(cString: s)), n > 0 { return n }
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }

    public init(threadCount: Int) {
        self.threadCount = max(1, threadCount)
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&wake, nil)
        for _ in 1..<self.threadCount {
            var t = pthread_t()
            let box = Unmanaged.passRetained(WorkerBox(pool: self))
            pthread_create(&t, nil, { arg in
                let box = Unmanaged<WorkerBox>.fromOpaque(arg!).takeRetainedValue()
                box.pool?.workerLoop()
                return nil
            }, box.toOpaque())
            threads.append(t)
        }
    }

    deinit {
        pthread_mutex_lock(&mutex)
        shuttingDown = true
        generation.wrappingIncrement(ordering: .sequentiallyConsistent)
        pthread_cond_broadcast(&wake)
        pthread_mutex_unlock(&mutex)
        for t in threads { pthread_join(t, nil) }
        pthread_cond_destroy(&wake)
        pthread_mutex_destroy(&mutex)
    }

    /// Runs `body(i)` for every i in 0..<count, spread over the pool; returns when all are done.
    public func parallelFor(_ count: Int, _ body: (Int) -> Void) {
        if count <= 0 { return }
        if count == 1 || threadCount == 1 {
            for i in 0..<count { body(i) }
            return
        }
        withoutActuallyEscaping(body) { body in
            var closure = body
            withUnsafePointer(to: &closure) { ptr in
                pthread_mutex_lock(&mutex)
                job = UnsafeRawPointer(ptr)
                taskCount = count
                nextTask.store(0, ordering: .relaxed)
                remaining.store(count, ordering: .relaxed)
                generation.wrappingIncrement(ordering: .sequentiallyConsistent)
                pthread_cond_broadcast(&wake)
                pthread_mutex_unlock(&mutex)
                runTasks(UnsafeRawPointer(ptr), count)
                var wait = SpinWait()
                while remaining.load(ordering: .acquiring) > 0 { wait.pause() }
                // No worker may join after this; wait for those that did to leave.
                pthread_mutex_lock(&mutex)
                job = nil
                pthread_mutex_unlock(&mutex)
                wait = SpinWait()
                while active.load(ordering: .acquiring) > 0 { wait.pause() }
            }
        }
    }

    /// Splits 0..<count into about `threadCount * 4` contiguous chunks (at least `grain` long).
    public func parallelRanges(_ count: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
        if count <= 0 { return }
        let chunks = min(max(1, count / max(1, grain)), threadCount * 4)
        let size = (count + chunks - 1) / chunks
        parallelFor((count + size - 1) / size) { c in
            body((c * size)..<min(count, (c + 1) * size))
        }
    }

    @inline(__always) private func runTasks(_ job: UnsafeRawPointer, _ count: Int) {
        let body = job.assumingMemoryBound(to: ((Int) -> Void).self)
        while true {
            let i = nextTask.loadThenWrappingIncrement(ordering: .relaxed)
            if i >= count { break }
            body.pointee(i)
            remaining.wrappingDecrement(ordering: .releasing)
        }
    }

    private func workerLoop() {
        var seen = 0
        while true {
            // Spin a little before sleeping: forward passes issue jobs back to back.
            var spins = 0
            var wait = SpinWait()
            while generation.load(ordering: .acquiring) == seen && spins < 20_000 {
                wait.pause()
                spins += 1
            }
            pthread_mutex_lock(&mutex)
            while generation.load(ordering: .acquiring) == seen && !shuttingDown {
                pthread_cond_wait(&wake, &mutex)
            }
            if shuttingDown {
                pthread_mutex_unlock(&mutex)
                return
            }
            seen = generation.load(ordering: .acquiring)
            let current = job
            let count = taskCount
            if current != nil { active.wrappingIncrement(ordering: .acquiringAndReleasing) }
            pthread_mutex_unlock(&mutex)
            if let current {
                runTasks(current, count)
                active.wrappingDecrement(ordering: .releasing)
            }
        }
    }
}

private final class WorkerBox {
    weak var pool: ThreadPool?
    init(pool: ThreadPool) { self.pool = pool }
}

/// Waiting for another thread of the pool: a few microseconds of `pause` (the other thread is
/// usually about to finish, and a system call per check costs more than the wait), then yields:
/// with as many threads as cores, a spinning waiter must not starve the thread it waits for.
struct SpinWait {
    private var spins = 0

    @inline(__always) mutating func pause() {
        if spins < 256 {
            spins &+= 1
            #if arch(x86_64)
            Builtin.int_x86_sse2_pause()
            #endif
        } else {
            sched_yield()
        }
    }
}
