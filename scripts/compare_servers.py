#!/usr/bin/env python3
"""`peregrine serve` beside llama.cpp's llama-server under the same streaming load: the same
GGUF, the same threads, prompts and output length, alternating, with medians and ratios.

    .build/release/peregrine quantize -m models/target --type F16 -o /tmp/target-f16.gguf
    python3 scripts/compare_servers.py --llama-server PATH/TO/llama-server --gguf /tmp/target-f16.gguf \
        [--peregrine .build/release/peregrine] [--peregrine-args "--kv-cache-type f16"] \
        [--clients 1,8,32] [--rounds 5] [--threads 2] \
        [--max-tokens 128] [--requests N] [--wait-idle 120] [--json-out results.json]
    python3 scripts/compare_servers.py --from-json results.json      # the tables again

For each concurrency N and each round, each server is started fresh on a free loopback port, its
/health waited for, loaded by scripts/serve_load.py (N streaming clients on /v1/completions,
temperature 0, ignore_eos, --max-tokens tokens each, --requests requests per client: by default
max(4, 16 / N); 2 unmeasured warm-up requests first), and stopped; which server goes first
alternates from one measurement to the next. The servers get equivalent settings:

    peregrine serve -m GGUF --host 127.0.0.1 --port P --threads T --max-sequences N
    llama-server    -m GGUF --host 127.0.0.1 --port P -t T -tb T -np N -c N*CTX --no-webui

N sequences generated at once on both; each llama-server slot gets CTX (--ctx, default 1024, the
shipped model's context) positions, as each Peregrine request may use the model's context.
Everything else is each server's default (llama-server: continuous batching, prompt cache,
batch 2048 / micro-batch 512; Peregrine: 512 batch tokens, prefix caching).

The machine may be shared: before each measurement the script waits (up to --wait-idle seconds)
for the CPUs to be under 10% busy, and it measures the CPU time that neither the server nor the
load generator used during the measurement (/proc/stat against /proc/PID/stat and the load
generator's rusage): "other jobs' CPU share". The table gives the median over rounds of output
tokens/s, p50 time to first token and p50 inter-token latency, and the ratios Peregrine /
llama-server (for TTFT lower is better); a second table keeps only the rounds during which other
jobs took less than --quiet-share of the CPUs, when some did not.
"""
import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
SERVERS = ("peregrine", "llama-server")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/health not ready after {timeout:.0f} s")


def server_command(kind, a, port, n):
    if kind == "peregrine":
        return [a.peregrine, "serve", "-m", a.gguf, "--host", "127.0.0.1", "--port", str(port),
                "--threads", str(a.threads), "--max-sequences", str(n)] + a.peregrine_args.split()
    return [a.llama_server, "-m", a.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
            "-tb", str(a.threads), "-np", str(n), "-c", str(n * a.ctx), "--no-webui"]


def cpu_busy_jiffies():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def process_jiffies(pid):
    """utime + stime of a process (all its threads), or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def children_cpu():
    """CPU seconds of the waited-for child processes (here: the load generators)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_idle(limit_s, busy_max=0.10):
    """Waits (up to limit_s) until the CPUs are less than busy_max busy over 2 s: other people's
    jobs on a shared machine. Returns the last busy fraction seen."""
    deadline = time.time() + limit_s
    while True:
        b0, t0 = cpu_busy_jiffies()
        time.sleep(2)
        b1, t1 = cpu_busy_jiffies()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy < busy_max or time.time() >= deadline:
            return busy
        time.sleep(3)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(kind, a, n, log_dir, tag):
    idle_busy = wait_idle(a.wait_idle) if a.wait_idle > 0 else None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(kind, a, port, n)
    log_path = os.path.join(log_dir, f"{kind}-{tag}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        load_before = os.getloadavg()[0]
        busy0, total0 = cpu_busy_jiffies()
        server0 = process_jiffies(proc.pid)
        requests = a.requests or max(4, 16 // n)
        load = [sys.executable, os.path.join(HERE, "serve_load.py"), "--url", url, "--clients", str(n),
                "--requests", str(requests), "--max-tokens", str(a.max_tokens), "--warmup", "2", "--json"]
        child0 = children_cpu()
        out = subprocess.run(load, capture_output=True, text=True, timeout=3600)
        child1 = children_cpu()
        if not out.stdout.strip():
            raise RuntimeError(f"serve_load.py gave nothing: {out.stderr[-500:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        busy1, total1 = cpu_busy_jiffies()
        server1 = process_jiffies(proc.pid)
        hz = os.sysconf("SC_CLK_TCK")
        # CPU time that was neither the server's nor the load generator's: other jobs on the machine.
        foreign = (busy1 - busy0 - (server1 - server0)) / hz - (child1 - child0)
        cpus = os.cpu_count() or 1
        result["loadavg_1m_before"] = load_before
        result["busy_before"] = idle_busy
        result["server_cpu_s"] = round((server1 - server0) / hz, 2)
        result["foreign_cpu_share"] = round(max(0.0, foreign) / max(1e-9, (total1 - total0) / hz), 3)
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with status {proc.returncode} during the load (log: {log_path})")
        return result
    finally:
        stop(proc)


def median(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peregrine", default=os.path.join(ROOT, ".build", "release", "peregrine"))
    ap.add_argument("--peregrine-args", default="",
                    help="more flags for peregrine serve, e.g. '--kv-cache-type f16' (llama-server's default cache type)")
    ap.add_argument("--llama-server", help="the llama-server binary (required unless --from-json)")
    ap.add_argument("--gguf", help="the model both servers load (required unless --from-json)")
    ap.add_argument("--clients", default="1,8,32", help="concurrencies, comma-separated (1,8,32)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context positions per sequence (1024)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, help="requests per client (default max(4, 16 / clients))")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="before each measurement, wait up to this many seconds for the CPUs to be under 10%% busy (120; 0: don't)")
    ap.add_argument("--quiet-share", type=float, default=0.10,
                    help="also tabulate the rounds during which other jobs took less than this share of the CPUs (0.10)")
    ap.add_argument("--json-out", help="write every measurement to this file")
    ap.add_argument("--from-json", help="print the tables of an earlier run's --json-out file instead of measuring")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        st = saved["settings"]
        concurrencies = sorted({x["clients"] for x in saved["runs"]}, key=[x["clients"] for x in saved["runs"]].index)
        report(saved["runs"], concurrencies, st["rounds"], st["threads"], st["max_tokens"], a.quiet_share)
        return
    if not a.llama_server or not a.gguf:
        ap.error("--llama-server and --gguf are required")
    for path in (a.peregrine, a.llama_server, a.gguf):
        if not os.path.exists(path):
            ap.error(f"{path} does not exist")
    concurrencies = [int(x) for x in a.clients.split(",")]

    runs = []  # dicts: server, clients, round, result
    flip = 0
    with tempfile.TemporaryDirectory(prefix="compare-servers-") as log_dir:
        for n in concurrencies:
            for r in range(a.rounds):
                order = SERVERS if flip % 2 == 0 else SERVERS[::-1]
                flip += 1
                for kind in order:
                    try:
                        res = measure(kind, a, n, log_dir, f"{n}-{r}")
                    except Exception as e:
                        print(f"{kind}, {n} clients, round {r + 1}: FAILED: {e}", file=sys.stderr)
                        log = os.path.join(log_dir, f"{kind}-{n}-{r}.log")
                        if os.path.exists(log):
                            print("".join(open(log, errors="replace").readlines()[-20:]), file=sys.stderr)
                        res = None
                    runs.append({"server": kind, "clients": n, "round": r + 1, "result": res})
                    if res:
                        print(f"{kind:>12}, {n:>3} clients, round {r + 1}: {res['output_tok_s']:8.1f} tok/s, "
                              f"TTFT p50 {fmt(res['ttft_ms']['p50'])} ms, ITL p50 {fmt(res['itl_ms']['p50'])} ms, "
                              f"{res['errors']} errors; other jobs took {res['foreign_cpu_share'] * 100:.0f}% of the CPUs", file=sys.stderr, flush=True)

    report(runs, concurrencies, a.rounds, a.threads, a.max_tokens, a.quiet_share)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"settings": vars(a), "runs": runs}, f, indent=1)
    failed = any(x["result"] is None or x["result"]["errors"] for x in runs)
    sys.exit(1 if failed else 0)


def summarize(runs, concurrencies, keep=lambda r: True):
    def pick(kind, n, f):
        return [f(x["result"]) for x in runs if x["server"] == kind and x["clients"] == n and x["result"] and keep(x["result"])]

    rows = []
    for n in concurrencies:
        row = {"clients": n}
        for kind in SERVERS:
            row[kind] = {
                "rounds": len(pick(kind, n, lambda r: r)),
                "output_tok_s": median(pick(kind, n, lambda r: r["output_tok_s"])),
                "ttft_p50_ms": median(pick(kind, n, lambda r: r["ttft_ms"]["p50"])),
                "ttft_p99_ms": median(pick(kind, n, lambda r: r["ttft_ms"]["p99"])),
                "itl_p50_ms": median(pick(kind, n, lambda r: r["itl_ms"]["p50"])),
                "itl_p99_ms": median(pick(kind, n, lambda r: r["itl_ms"]["p99"])),
                "requests_s": median(pick(kind, n, lambda r: r["requests_s"])),
                "errors": sum(pick(kind, n, lambda r: r["errors"])),
                "per_round_tok_s": pick(kind, n, lambda r: r["output_tok_s"]),
                "foreign_cpu_share": median(pick(kind, n, lambda r: r.get("foreign_cpu_share"))),
            }
        rows.append(row)
    return rows


def print_table(rows):
    def pct(x):
        return None if x is None else x * 100

    def ratio(x, y):
        return x / y if x is not None and y else None

    print("| clients | rounds | Peregrine tok/s | llama-server tok/s | ratio | Peregrine TTFT p50 ms | llama-server TTFT p50 ms "
          "| ratio | Peregrine ITL p50 ms | llama-server ITL p50 ms | errors | other jobs' CPU share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p, l = row["peregrine"], row["llama-server"]
        print(f"| {row['clients']} | {p['rounds']} / {l['rounds']} | {fmt(p['output_tok_s'])} | {fmt(l['output_tok_s'])} | "
              f"{fmt(ratio(p['output_tok_s'], l['output_tok_s']), 2)}x | {fmt(p['ttft_p50_ms'])} | {fmt(l['ttft_p50_ms'])} | "
              f"{fmt(ratio(p['ttft_p50_ms'], l['ttft_p50_ms']), 2)}x | {fmt(p['itl_p50_ms'], 2)} | {fmt(l['itl_p50_ms'], 2)} | "
              f"{p['errors']} / {l['errors']} | {fmt(pct(p['foreign_cpu_share']), 0)}% / {fmt(pct(l['foreign_cpu_share']), 0)}% |")


def report(runs, concurrencies, rounds, threads, max_tokens, quiet_share):
    rows = summarize(runs, concurrencies)
    print(f"\nmedians of {rounds} rounds; {threads} threads; {max_tokens} tokens per request; "
          f"ratios Peregrine / llama-server; the CPU share other jobs took during the measurements (median)\n")
    print_table(rows)
    print("\nper-round output tok/s (Peregrine ; llama-server):")
    for row in rows:
        print(f"  {row['clients']} clients: " + ", ".join(f"{x:.1f}" for x in row["peregrine"]["per_round_tok_s"]) + " ; "
              + ", ".join(f"{x:.1f}" for x in row["llama-server"]["per_round_tok_s"]))
    quiet = lambda r: (r.get("foreign_cpu_share") or 0) < quiet_share  # noqa: E731
    if any(x["result"] and not quiet(x["result"]) for x in runs):
        print(f"\nonly the rounds during which other jobs took under {quiet_share * 100:.0f}% of the CPUs:\n")
        print_table(summarize(runs, concurrencies, quiet))
    return rows


if __name__ == "__main__":
    main()
