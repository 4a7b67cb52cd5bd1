#!/usr/bin/env python3
"""Load test for `chatforge serve` from a second process on loopback (pip `openai`):

1. one client alone, streaming requests back to back for --solo-seconds: tokens/s;
2. --clients concurrent streaming clients for --seconds, each request with its own prompt and seed;
3. a sample of those requests replayed one at a time: each streamed text must equal what the same
   prompt and seed give alone (no lost, cut or mixed-up streams).
Prints errors, mismatches, aggregate tokens/s against one client alone, latency and time to first
token percentiles, and one JSON line.

usage: serve_load.py --url http://127.0.0.1:8000/v1 [--clients 16] [--seconds 60]

Its soak counterpart, bench/serve_soak.py, adds what a server meets in the wild: 2,000-token
prompts, clients that hang up mid-stream, oversized bodies, one-byte-a-second clients, and the
server's memory before, at peak and after.
"""
import argparse, json, random, statistics, sys, threading, time

import openai

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
ap.add_argument("--api-key", default="none")
ap.add_argument("--clients", type=int, default=16)
ap.add_argument("--seconds", type=float, default=60)
ap.add_argument("--solo-seconds", type=float, default=20)
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--verify", type=int, default=48, help="requests replayed alone")
args = ap.parse_args()

client = openai.OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
model = client.models.list().data[0].id
SUBJECTS = ["cat", "dog", "duck", "horse", "cow", "sheep", "猫", "狗", "鸭子"]
QUESTIONS = ["How many legs does a {} have?", "What does a {} eat?", "What sound does a {} make?",
             "Where does a {} live?", "{}有几条腿？", "Tell me a story about a {}."]


def prompt_for(k):
    rng = random.Random(k)
    return rng.choice(QUESTIONS).format(rng.choice(SUBJECTS))


def one(k):
    """Streams request k; returns (text, tokens, seconds, time to first token)."""
    start = time.time()
    first = None
    pieces, tokens = [], 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt_for(k)}], max_tokens=args.max_tokens,
        temperature=0.9, seed=k, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.time() - start
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), tokens, time.time() - start, first or (time.time() - start)


def run_clients(n, seconds, base):
    results, errors, lock = [], [], threading.Lock()
    deadline = time.time() + seconds

    def worker(c):
        i = 0
        while time.time() < deadline:
            k = base + c * 100000 + i
            i += 1
            try:
                r = one(k)
                with lock:
                    results.append((k,) + r)
            except Exception as e:  # every failure is counted and shown
                with lock:
                    errors.append(f"client {c} request {k}: {e!r}")

    start = time.time()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.time() - start


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


solo, solo_errors, solo_time = run_clients(1, args.solo_seconds, 1)
solo_tps = sum(r[2] for r in solo) / solo_time
print(f"one client alone: {len(solo)} requests, {solo_tps:.1f} tokens/s")
many, errors, many_time = run_clients(args.clients, args.seconds, 10_000_000)
tps = sum(r[2] for r in many) / many_time
print(f"{args.clients} clients: {len(many)} requests, {len(errors)} errors, {tps:.1f} tokens/s "
      f"({tps / solo_tps:.2f}x one client alone)")
for e in errors[:5]:
    print("  error:", e)
latency = [r[3] for r in many]
ttft = [r[4] for r in many]
print(f"latency p50 {pct(latency, .5):.2f} s, p95 {pct(latency, .95):.2f} s; "
      f"first token p50 {pct(ttft, .5):.2f} s, p95 {pct(ttft, .95):.2f} s")
sample = random.Random(0).sample(many, min(args.verify, len(many)))
mismatches = []
for k, text, *_ in sample:
    alone = one(k)[0]
    if alone != text:
        mismatches.append((k, text, alone))
print(f"replayed alone: {len(sample)} requests, {len(mismatches)} differ")
for k, a, b in mismatches[:3]:
    print(f"  request {k}: under load {a!r}\n             alone      {b!r}")
print(json.dumps({"clients": args.clients, "seconds": args.seconds, "requests": len(many), "errors": len(errors),
                  "tokens_per_second": round(tps, 1), "solo_tokens_per_second": round(solo_tps, 1),
                  "ratio": round(tps / solo_tps, 2), "verified": len(sample), "mismatches": len(mismatches),
                  "latency_p50": round(pct(latency, .5), 3), "ttft_p50": round(pct(ttft, .5), 3)}))
sys.exit(1 if errors or mismatches else 0)
