#!/usr/bin/env python3
"""Load generator for an OpenAI-compatible /v1/completions endpoint (`peregrine serve`,
llama.cpp's llama-server, vLLM, ...): N concurrent streaming clients, fixed prompts, fixed
output length, and the throughput and latency they saw.

    python3 scripts/serve_load.py --url http://127.0.0.1:8080 --clients 8 --requests 4
    python3 scripts/serve_load.py --url http://127.0.0.1:8080 --clients 32 --duration 60 --json

Standard library only: one thread and one keep-alive HTTP/1.1 connection (http.client) per client.

Every request is `{"prompt": P, "max_tokens": M, "temperature": 0, "ignore_eos": true, "seed":
S, "stream": true, "stream_options": {"include_usage": true}}` (plus `"model"` with --model).
Prompts come from models/corpus/test.txt, cut deterministically into pieces of about
--prompt-chars characters at word boundaries; client c's r-th request takes piece
(offset + r * clients + c), so every request of a run has its own prompt and two runs with the
same arguments send the same requests in the same order (a run longer than the corpus wraps
around). --warmup requests (not measured, one at a time) take the corpus's last pieces. With
--prompt-tokens N every prompt is instead a list of N random token ids (fixed by --seed), so the
server reads exactly the prompt tokens `peregrine bench --throughput --input-len N` reads.

Generated tokens are counted from the `usage` object that ends the stream:
`stream_options.include_usage` makes OpenAI's server, vLLM and Peregrine send a last chunk with
no choices carrying it, and llama-server puts it in its final chunk (the one with
finish_reason) whether asked or not. A stream without usage falls back to counting chunks with
text, and is reported (`usage_missing`). A request is an error if its status is not 200, the
stream breaks, carries an error object, does not end with `data: [DONE]`, has no finish_reason,
or (with ignore_eos) generated a number of tokens other than max_tokens.

Reported: output tokens/s and requests/s over the wall time from the first request to the last
response; time to first token (request sent -> first chunk with text) and inter-token latency
(gaps between successive chunks with text of one response, as they arrive) as p50/p90/p99 in
milliseconds; errors. The load generator shares the machine with the server when both run on
one host: its own CPU time is reported too (`client_cpu_s`).
"""
import argparse
import http.client
import json
import os
import select
import sys
import threading
import time
import urllib.parse

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_CORPUS = os.path.join(ROOT, "models", "corpus", "test.txt")


def corpus_prompts(path=DEFAULT_CORPUS, chars=256, count=4096):
    """Up to `count` pieces of the corpus, each about `chars` characters of running text cut at
    word boundaries (whitespace collapsed), in corpus order."""
    with open(path, encoding="utf-8") as f:
        words = f.read().split()
    prompts, piece, length = [], [], 0
    for w in words:
        piece.append(w)
        length += len(w) + 1
        if length >= chars:
            prompts.append(" ".join(piece))
            piece, length = [], 0
            if len(prompts) == count:
                break
    if not prompts:
        raise SystemExit(f"no prompts in {path}")
    return prompts


def token_prompts(length, low, high, seed, count=4096):
    """`count` prompts of `length` token ids each, drawn uniformly from [low, high) with a fixed
    seed; the server reads a list of ids as the prompt's tokens, so every server sees the same
    number of prompt tokens whatever its tokenizer."""
    import random
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


def percentile(values, p):
    """The p-th percentile (0-100) with linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class StreamResult:
    """What one streamed completion request gave."""
    __slots__ = ("sent", "first", "end", "chunk_times", "text", "finish_reason", "usage", "done", "error", "status", "ids",
                 "objects", "events", "reconnected")

    def __init__(self):
        self.sent = self.first = self.end = None
        self.chunk_times = []  # arrival time of every chunk with text
        self.text = []
        self.finish_reason = None
        self.usage = None
        self.done = False
        self.error = None
        self.status = None
        self.ids = set()  # the `id` of every event
        self.objects = set()  # the `object` of every event
        self.events = 0
        self.reconnected = False  # a kept-alive connection had been closed by the server

    @property
    def completion_tokens(self):
        if isinstance(self.usage, dict) and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return len(self.chunk_times)


class Client:
    """One keep-alive HTTP/1.1 connection to the server; reconnects after a failure."""

    def __init__(self, url, timeout=300.0, api_key=None):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit(f"only http:// URLs are supported (got {url})")
        self.host, self.port = u.hostname, u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn = None

    def _peer_closed(self):
        """True if the server has closed the idle connection (it is readable: EOF)."""
        sock = self.conn.sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def stream_completion(self, body):
        """POSTs `body` (a dict with stream: true) to /v1/completions and reads the events."""
        r = StreamResult()
        payload = json.dumps(body).encode()
        try:
            for attempt in (0, 1):
                reused = self.conn is not None
                if reused and self._peer_closed():
                    self.close()
                    reused = False
                    r.reconnected = True
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                r.sent = time.perf_counter()
                try:
                    self.conn.request("POST", self.prefix + "/v1/completions", body=payload, headers=self.headers)
                    resp = self.conn.getresponse()
                    break
                except ConnectionError:
                    # A kept-alive connection the server closed before reading this request (as
                    # llama-server does after every stream, though it answers "Keep-Alive"):
                    # nothing was processed, so it is sent again once on a new connection.
                    self.close()
                    if not reused or attempt:
                        raise
                    r.reconnected = True
            r.status = resp.status
            if resp.status != 200:
                detail = resp.read()[:300].decode(errors="replace")
                r.error = f"HTTP {resp.status}: {detail}"
                r.end = time.perf_counter()
                if resp.will_close:
                    self.close()
                return r
            while True:
                line = resp.readline()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, other fields
                data = line[5:].strip()
                if data == b"[DONE]":
                    r.done = True
                    break
                now = time.perf_counter()
                try:
                    obj = json.loads(data)
                except ValueError:
                    r.error = f"malformed event: {data[:200]!r}"
                    break
                if not isinstance(obj, dict):
                    r.error = f"event is not an object: {data[:200]!r}"
                    break
                r.events += 1
                r.ids.add(obj.get("id"))
                r.objects.add(obj.get("object"))
                if obj.get("error") is not None:
                    r.error = f"error event: {json.dumps(obj['error'])[:300]}"
                    continue
                for ch in obj.get("choices") or []:
                    text = ch.get("text")
                    if text:
                        if r.first is None:
                            r.first = now
                        r.chunk_times.append(now)
                        r.text.append(text)
                    if ch.get("finish_reason") is not None:
                        r.finish_reason = ch["finish_reason"]
                if isinstance(obj.get("usage"), dict):
                    r.usage = obj["usage"]
            resp.read()  # the rest of the body (the closing chunk), so the connection can be reused
            r.end = time.perf_counter()
            if not r.done and r.error is None:
                r.error = "stream ended without data: [DONE]"
            if resp.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as e:
            r.end = time.perf_counter()
            r.error = f"{type(e).__name__}: {e}"
            self.close()
        return r


def request_body(prompt, max_tokens, seed, model=None, ignore_eos=True, temperature=0.0):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if model:
        body["model"] = model
    return body


def check_result(r, max_tokens):
    """The reason a finished request does not count as a success, or None."""
    if r.error:
        return r.error
    if r.finish_reason is None:
        return "no finish_reason"
    if r.completion_tokens != max_tokens:
        return f"{r.completion_tokens} tokens generated, {max_tokens} asked for"
    return None


def run_load(url, clients, max_tokens, prompts, requests_per_client=None, duration=None, warmup=0, offset=0,
             seed=1234, model=None, timeout=300.0, api_key=None):
    """Runs the load and returns a summary dict (see `summarize`)."""
    if requests_per_client is None and duration is None:
        raise ValueError("give requests_per_client or duration")
    limit = requests_per_client if requests_per_client is not None else 1 << 60
    if duration is None and clients * limit + warmup > len(prompts):
        print(f"note: {needed} requests over {len(prompts)} prompts: some prompts repeat", file=sys.stderr)

    # Warm-up: one client at a time is enough to page in weights and build caches.
    warm = Client(url, timeout, api_key)
    for i in range(warmup):
        p = prompts[-1 - i % len(prompts)]
        r = warm.stream_completion(request_body(p, max_tokens, seed, model))
        if check_result(r, max_tokens):
            raise SystemExit(f"warm-up request failed: {check_result(r, max_tokens)}")
    warm.close()

    results = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    state = {}

    def worker(c):
        client = Client(url, timeout, api_key)
        barrier.wait()
        deadline = state["start"] + duration if duration is not None else None
        r_index = 0
        while r_index < limit and (deadline is None or time.perf_counter() < deadline):
            p = prompts[(offset + r_index * clients + c) % len(prompts)]
            results[c].append(client.stream_completion(request_body(p, max_tokens, seed, model)))
            r_index += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    state["start"] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    end = time.perf_counter()
    cpu = time.process_time() - cpu0
    return summarize([r for rs in results for r in rs], state["start"], end, max_tokens, clients, cpu)


def summarize(results, start, end, max_tokens, clients, client_cpu=None):
    wall = end - start
    ok = [r for r in results if check_result(r, max_tokens) is None]
    errors = {}
    for r in results:
        why = check_result(r, max_tokens)
        if why:
            key = why[:120]
            errors[key] = errors.get(key, 0) + 1
    tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.usage.get("prompt_tokens", 0) for r in ok if isinstance(r.usage, dict))
    ttft = [(r.first - r.sent) * 1000 for r in ok if r.first is not None]
    itl = [(b - a) * 1000 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [(r.end - r.sent) * 1000 for r in ok]

    def pct(v):
        return {f"p{p}": (round(percentile(v, p), 3) if v else None) for p in (50, 90, 99)}

    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "requests": len(results),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "usage_missing": sum(1 for r in ok if r.usage is None),
        "reconnects": sum(1 for r in results if r.reconnected),
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "text_chunks": sum(len(r.chunk_times) for r in ok),
        "prompt_tokens": prompt_tokens,
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_ms": pct(ttft),
        "itl_ms": pct(itl),
        "e2e_ms": pct(e2e),
        "client_cpu_s": round(client_cpu, 2) if client_cpu is not None else None,
    }


def print_summary(s, out=sys.stdout):
    def fmt(d):
        return " / ".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))

    print(f"clients {s['clients']}, max_tokens {s['max_tokens']}: {s['ok']} of {s['requests']} requests ok "
          f"in {s['wall_s']:.2f} s, {s['errors']} errors", file=out)
    print(f"  output       {s['output_tok_s']} tok/s ({s['output_tokens']} tokens in {s['text_chunks']} chunks with text), "
          f"{s['requests_s']} requests/s", file=out)
    print(f"  TTFT         p50/p90/p99 {fmt(s['ttft_ms'])} ms", file=out)
    print(f"  inter-token  p50/p90/p99 {fmt(s['itl_ms'])} ms", file=out)
    print(f"  end-to-end   p50/p90/p99 {fmt(s['e2e_ms'])} ms", file=out)
    print(f"  load generator CPU {s['client_cpu_s']} s", file=out)
    if s["reconnects"]:
        print(f"  {s['reconnects']} requests found their kept-alive connection closed by the server and opened a new one",
              file=out)
    if s["usage_missing"]:
        print(f"  {s['usage_missing']} streams had no usage: their tokens were counted by chunks with text", file=out)
    for why, n in s["error_kinds"].items():
        print(f"  error x{n}: {why}", file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL (without /v1)")
    ap.add_argument("--clients", "-c", type=int, default=8, help="concurrent streaming clients (8)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--requests", "-n", type=int, help="requests per client (default 4 without --duration)")
    g.add_argument("--duration", "-d", type=float, help="seconds during which clients start new requests")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (128, with ignore_eos)")
    ap.add_argument("--prompt-chars", type=int, default=256, help="prompt length in characters (256)")
    ap.add_argument("--prompt-offset", type=int, default=0, help="first corpus piece used (0)")
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="text the prompts are cut from")
    ap.add_argument("--prompt-tokens", type=int,
                    help="send prompts of exactly this many token ids instead of text (random ids in"
                         " [--token-low, --token-high), fixed by --seed): the work of `peregrine bench"
                         " --throughput --input-len N`, whatever the tokenizer")
    ap.add_argument("--token-low", type=int, default=100, help="--prompt-tokens: lowest id (100)")
    ap.add_argument("--token-high", type=int, default=32000, help="--prompt-tokens: one past the highest id (32000)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests sent first, one at a time (2)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--model", help="the `model` field of each request (left out by default)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token ($OPENAI_API_KEY)")
    ap.add_argument("--timeout", type=float, default=300.0, help="socket timeout per read, seconds (300)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = ap.parse_args()
    if a.clients < 1:
        ap.error("--clients must be >= 1")
    if a.duration is None and a.requests is None:
        a.requests = 4
    if a.prompt_tokens is not None:
        if a.prompt_tokens < 1 or not 0 <= a.token_low < a.token_high:
            ap.error("--prompt-tokens must be >= 1 and --token-low < --token-high")
        prompts = token_prompts(a.prompt_tokens, a.token_low, a.token_high, a.seed)
    else:
        prompts = corpus_prompts(a.corpus, a.prompt_chars)
    s = run_load(a.url, a.clients, a.max_tokens, prompts, requests_per_client=a.requests, duration=a.duration,
                 warmup=a.warmup, offset=a.prompt_offset, seed=a.seed, model=a.model, timeout=a.timeout,
                 api_key=a.api_key)
    s["url"] = a.url
    if a.json:
        print(json.dumps(s))
    else:
        print_summary(s)
    sys.exit(1 if s["errors"] else 0)


if __name__ == "__main__":
    main()
