#!/usr/bin/env python3
"""Soak test of a running `peregrine serve`: many concurrent streaming clients for a fixed time,
every answer checked against the same request made alone, the server's memory watched.

    .build/release/peregrine serve -m models/target --port 8080 &
    python3 scripts/soak.py --url http://127.0.0.1:8080 [--duration 600] [--clients 64] [--pid PID]

Loopback servers only. The server's process id is found from the listening socket of the URL's
port (/proc/net/tcp and /proc/*/fd; same user, or root), or given with --pid.

1. References: each of --prompts prompts (pieces of models/corpus/test.txt, as
   scripts/serve_load.py cuts them), with its own max_tokens between 8 and 128, is sent alone,
   one request at a time, greedy (temperature 0) with a fixed seed; the first eight are sent
   twice and must agree with themselves.
2. Load: --clients threads, each with a keep-alive connection, send these requests (client c's
   k-th request is prompt (13 c + k) mod --prompts) as streams until --duration seconds have
   passed or --max-requests have been sent, whichever comes first; requests in flight then
   finish. Every response must be well formed and complete: status 200, every event a JSON
   object of `object` text_completion with one `id`, no error event, a finish_reason, a last
   `usage` chunk (stream_options.include_usage) with prompt_tokens equal to the reference's,
   completion_tokens at most max_tokens (equal to it when finish_reason is "length"),
   total_tokens their sum, then `data: [DONE]`; and the same text, finish_reason and usage as
   the request's reference.
3. Memory: VmRSS of the server (/proc/PID/status) is sampled every --sample-interval seconds;
   after --warmup seconds of load its first, last and largest values are reported, and a
   largest value more than --max-rss-growth (10%) above the first fails the soak.
4. Afterwards the server must still be running, /health must answer 200 and /metrics must show
   no running or waiting request.

Prints a summary and exits 0 when everything held, 1 otherwise (2 for bad arguments).
"""
import argparse
import glob
import http.client
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import DEFAULT_CORPUS, Client, corpus_prompts, percentile, request_body  # noqa: E402


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listener_pid(port):
    """The pid of the process with a listening TCP socket on `port`, or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, st, inode = fields[1], fields[3], fields[9]
                    if st == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            pass
    if not inodes:
        return None
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return int(fd.split("/")[2])
        except OSError:
            continue
    return None


def rss_kib(pid):
    """VmRSS of `pid` in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def get(url, path, timeout=10):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", u.path.rstrip("/") + path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def problems(r, max_tokens, reference=None):
    """Why a streamed response is not complete and well formed (and equal to its reference)."""
    out = []
    if r.error:
        return [r.error]
    if r.status != 200:
        return [f"status {r.status}"]
    if not r.done:
        out.append("no data: [DONE]")
    if r.objects != {"text_completion"}:
        out.append(f"event objects {sorted(map(str, r.objects))}")
    if len(r.ids) != 1 or None in r.ids:
        out.append(f"{len(r.ids)} distinct ids")
    if r.finish_reason not in ("length", "stop"):
        out.append(f"finish_reason {r.finish_reason!r}")
    u = r.usage
    if not isinstance(u, dict):
        out.append("no usage")
    else:
        p, c, t = u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens")
        if not all(isinstance(x, int) for x in (p, c, t)):
            out.append(f"usage not integers: {u}")
        else:
            if p < 1 or c < 0 or c > max_tokens or t != p + c:
                out.append(f"usage out of range: {u}")
            if r.finish_reason == "length" and c != max_tokens:
                out.append(f"finish_reason length after {c} of {max_tokens} tokens")
    if reference is not None and not out:
        text, ref_text = "".join(r.text), "".join(reference.text)
        if text != ref_text:
            i = next((k for k, (a, b) in enumerate(zip(text, ref_text)) if a != b), min(len(text), len(ref_text)))
            out.append(f"text differs from the request made alone at character {i}: "
                       f"{text[max(0, i - 20):i + 30]!r} vs {ref_text[max(0, i - 20):i + 30]!r}")
        if r.finish_reason != reference.finish_reason:
            out.append(f"finish_reason {r.finish_reason} vs {reference.finish_reason} alone")
        ru = reference.usage
        if (u["prompt_tokens"], u["completion_tokens"]) != (ru["prompt_tokens"], ru["completion_tokens"]):
            out.append(f"usage {u} vs {ru} alone")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL, on loopback")
    ap.add_argument("--pid", type=int, help="the server's process id (default: found from the port)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds during which new requests start (600)")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="requests sent at most, in all (1000000)")
    ap.add_argument("--prompts", type=int, default=64, help="distinct requests (64)")
    ap.add_argument("--warmup", type=float, help="seconds of load before the memory baseline (default: a tenth of --duration)")
    ap.add_argument("--sample-interval", type=float, default=5.0, help="seconds between memory samples (5)")
    ap.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed growth of VmRSS after warm-up (0.10)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", help="the `model` field of each request (left out by default)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    if u.scheme != "http" or not u.hostname or not is_loopback(u.hostname):
        ap.error(f"{a.url}: only http:// on a loopback address")
    if a.clients < 1 or a.duration <= 0 or a.prompts < 1 or a.max_requests < 1:
        ap.error("--clients, --duration, --prompts and --max-requests must be positive")
    warmup = a.warmup if a.warmup is not None else a.duration / 10
    pid = a.pid or listener_pid(u.port or 80)
    if pid is None or rss_kib(pid) is None:
        ap.error(f"cannot find the server's process (listening on port {u.port}); give --pid")

    failures = []  # (what, detail)
    lock = threading.Lock()

    def fail(what, detail):
        with lock:
            failures.append((what, detail))

    # 1. References, one request at a time.
    texts = corpus_prompts(a.corpus, 256)
    requests = []
    for i in range(a.prompts):
        requests.append((texts[(i * 7) % len(texts)], 8 + (i * 37) % 121))
    status, _ = get(a.url, "/health")
    if status != 200:
        print(f"FAIL: {a.url}/health answered {status}")
        sys.exit(1)
    t0 = time.perf_counter()
    refs = []
    client = Client(a.url, 120, a.api_key)
    for i, (prompt, m) in enumerate(requests):
        body = request_body(prompt, m, a.seed, a.model, ignore_eos=False)
        r = client.stream_completion(body)
        why = problems(r, m)
        if why:
            print(f"FAIL: reference request {i} alone: {'; '.join(why)}")
            sys.exit(1)
        refs.append(r)
        if i < 8:
            again = client.stream_completion(body)
            why = problems(again, m, r)
            if why:
                fail("alone twice", f"request {i}: {'; '.join(why)}")
    client.close()
    ref_tokens = sum(r.usage["completion_tokens"] for r in refs)
    print(f"references: {len(refs)} requests alone in {time.perf_counter() - t0:.1f} s, {ref_tokens} tokens; "
          f"server pid {pid}, VmRSS {rss_kib(pid) / 1024:.1f} MiB", flush=True)

    # 2. Load, with 3. memory sampling beside it.
    samples = []  # (seconds since start, KiB)
    stop_sampling = threading.Event()
    start = time.perf_counter()
    deadline = start + a.duration
    sent = [0]
    stats = {"ok": 0, "tokens": 0, "bad": 0}
    ttfts, itls = [], []
    examples = {}

    def sampler():
        while not stop_sampling.is_set():
            kib = rss_kib(pid)
            if kib is None:
                fail("crash", f"server process {pid} is gone at {time.perf_counter() - start:.0f} s")
                return
            samples.append((time.perf_counter() - start, kib))
            stop_sampling.wait(a.sample_interval)

    def worker(c):
        cl = Client(a.url, 120, a.api_key)
        k = 0
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= a.max_requests:
                    break
                sent[0] += 1
            i = (13 * c + k) % len(requests)
            k += 1
            prompt, m = requests[i]
            r = cl.stream_completion(request_body(prompt, m, a.seed, a.model, ignore_eos=False))
            why = problems(r, m, refs[i])
            with lock:
                if why:
                    stats["bad"] += 1
                    key = why[0].split(":")[0][:60]
                    examples.setdefault(key, []).append(f"client {c}, request {i} (max_tokens {m}): {'; '.join(why)}")
                else:
                    stats["ok"] += 1
                    stats["tokens"] += r.usage["completion_tokens"]
                    if r.first is not None:
                        ttfts.append(r.first - r.sent)
                    itls.extend(b - x for x, b in zip(r.chunk_times, r.chunk_times[1:]))
        cl.close()

    sampler_thread = threading.Thread(target=sampler, daemon=True)
    sampler_thread.start()
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(a.clients)]
    for t in threads:
        t.start()
    last_report = start
    while any(t.is_alive() for t in threads):
        now = time.perf_counter()
        if now > deadline + 300:
            fail("hang", f"{sum(t.is_alive() for t in threads)} clients still busy 300 s after the deadline")
            break
        if now - last_report >= 60:
            last_report = now
            with lock:
                print(f"  {now - start:5.0f} s: {stats['ok']} ok, {stats['bad']} failed, "
                      f"VmRSS {samples[-1][1] / 1024 if samples else 0:.1f} MiB", flush=True)
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=1)
    elapsed = time.perf_counter() - start
    stop_sampling.set()
    sampler_thread.join(timeout=a.sample_interval + 5)
    for key, lines in examples.items():
        fail(key, f"{len(lines)} responses, e.g. {lines[0]}")

    # 4. The server afterwards.
    if rss_kib(pid) is None:
        fail("crash", f"server process {pid} is gone after the load")
    else:
        try:
            status, _ = get(a.url, "/health")
            if status != 200:
                fail("health", f"/health answered {status} after the load")
            idle = None
            for _ in range(20):
                status, text = get(a.url, "/metrics")
                gauges = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                          if ln.startswith(("peregrine_requests_running ", "peregrine_requests_waiting "))}
                idle = gauges
                if status == 200 and gauges and not any(gauges.values()):
                    break
                time.sleep(0.5)
            else:
                fail("metrics", f"requests still running or waiting after the load: {idle}")
        except (OSError, http.client.HTTPException) as e:
            fail("health", f"the server does not answer after the load: {e}")

    after = [(t, k) for t, k in samples if t >= warmup]
    rss = None
    if after:
        first, last, peak = after[0][1], after[-1][1], max(k for _, k in after)
        growth = peak / first - 1
        rss = {"first_mib": round(first / 1024, 1), "last_mib": round(last / 1024, 1), "max_mib": round(peak / 1024, 1),
               "growth": round(growth, 4), "samples": len(after), "before_warmup_max_mib":
               round(max((k for t, k in samples if t < warmup), default=0) / 1024, 1)}
        if growth > a.max_rss_growth:
            fail("memory", f"VmRSS grew {growth * 100:.1f}% after warm-up ({first / 1024:.1f} -> max {peak / 1024:.1f} MiB)")
    else:
        fail("memory", "no memory sample after warm-up (duration shorter than warm-up?)")

    def ms(v, p):
        x = percentile(v, p)
        return None if x is None else round(x * 1000, 1)

    summary = {
        "clients": a.clients, "duration_s": round(elapsed, 1), "distinct_requests": len(requests),
        "requests": stats["ok"] + stats["bad"], "ok": stats["ok"], "failed": stats["bad"],
        "output_tokens": stats["tokens"], "output_tok_s": round(stats["tokens"] / elapsed, 1),
        "ttft_ms": {"p50": ms(ttfts, 50), "p99": ms(ttfts, 99)}, "itl_ms": {"p50": ms(itls, 50), "p99": ms(itls, 99)},
        "rss_after_warmup": rss, "warmup_s": warmup,
        "rss_timeline_mib": [(round(t), round(k / 1024, 1)) for t, k in samples[::max(1, int(60 / a.sample_interval))]],
        "failures": [f"{w}: {d}" for w, d in failures],
    }
    print(f"soak: {a.clients} clients for {elapsed:.0f} s: {summary['requests']} requests, {stats['ok']} complete and "
          f"identical to the request alone, {stats['bad']} not; {stats['tokens']} tokens, {summary['output_tok_s']} tok/s")
    print(f"  TTFT p50/p99 {summary['ttft_ms']['p50']} / {summary['ttft_ms']['p99']} ms, "
          f"inter-token p50/p99 {summary['itl_ms']['p50']} / {summary['itl_ms']['p99']} ms")
    if rss:
        print(f"  VmRSS after {warmup:.0f} s warm-up: first {rss['first_mib']} MiB, last {rss['last_mib']} MiB, "
              f"max {rss['max_mib']} MiB ({rss['growth'] * 100:+.1f}%, {rss['samples']} samples; "
              f"max during warm-up {rss['before_warmup_max_mib']} MiB)")
    print("  VmRSS by minute (s, MiB): " + ", ".join(f"{t}:{m}" for t, m in summary["rss_timeline_mib"]))
    for f in summary["failures"]:
        print(f"  FAIL {f}")
    print("PASS" if not failures else "FAIL")
    if a.json:
        print(json.dumps(summary))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
