#!/usr/bin/env python3
"""How much a long prompt joining slows the streams already running in `chatforge serve`.

Starts the server on --model, then runs the same scene twice: --streams streaming clients decode
--max-tokens tokens each (end-of-turn suppressed, so every stream runs its length); in the second
run a --long-tokens prompt arrives once the streams are under way. For each run it prints the
running streams' time between tokens (median, p99, max) over the window the long prompt's prefill
covers (from its arrival to its first token; the same stretch of the first run), and the ratio of
the two p99s. Chunked prefill keeps that ratio near 1.5; prefilling in one piece stalls every
stream for the whole prefill.

usage: serve_prefill_stall.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--streams 8]
"""
import argparse, http.client, json, random, socket, subprocess, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/chatforge")
ap.add_argument("--model", required=True)
ap.add_argument("--streams", type=int, default=8)
ap.add_argument("--max-tokens", type=int, default=160)
ap.add_argument("--long-tokens", type=int, default=2000, help="words in the long prompt")
ap.add_argument("--join-after", type=float, default=1.5, help="seconds into the streams")
args = ap.parse_args()

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
PORT = sock.getsockname()[1]
sock.close()
server = subprocess.Popen([args.bin, "serve", "--model", args.model, "--port", str(PORT),
                           "--max-batch", str(args.streams + 1)], stderr=subprocess.DEVNULL)


def request(body):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=2)
        c.request("GET", "/health")
        if c.getresponse().status == 200:
            break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("the server did not start")

c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
c.request("GET", "/v1/models")
MODEL = json.loads(c.getresponse().read())["data"][0]["id"]
# SmolLM2's <|endoftext|> (0) and <|im_end|> (2) suppressed: every stream runs --max-tokens.
NO_STOP = {"0": -100, "2": -100}
LONG = " ".join(random.Random(1).choice(["the", "cat", "sat", "on", "a", "warm", "mat", "and", "slept"])
                for _ in range(args.long_tokens))


def stream(content, max_tokens, seed):
    """Streams one reply; returns the arrival time of each content piece."""
    conn, resp = request({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                          "temperature": 0.7, "seed": seed, "stream": True, "logit_bias": NO_STOP})
    if resp.status != 200:
        sys.exit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
    conn.close()
    return times


def scene(with_long):
    arrivals = [None] * args.streams
    long = {}

    def run(i):
        arrivals[i] = stream(f"Tell me a long story about animal number {i}.", args.max_tokens, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.join_after)
    joined = time.perf_counter()
    if with_long:
        long["times"] = stream(LONG + "\n\nSum that up in one word.", 4, 99)
    for t in threads:
        t.join()
    # The window: the long prompt's arrival to its first token (the same stretch without it).
    end = long["times"][0] if with_long else None
    return arrivals, joined, end, start


def gaps(arrivals, lo, hi):
    out = []
    for times in arrivals:
        # Every gap that overlaps the window, so that a stall spanning all of it counts.
        out += [b - a for a, b in zip(times, times[1:]) if b >= lo and a <= hi]
    return sorted(out)


def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


try:
    stream("Hello", 8, 0)  # warm up
    with_long, joined, end, _ = scene(True)
    window = end - joined
    alone, joined_alone, _, _ = scene(False)
    g_long = gaps(with_long, joined, end)
    g_alone = gaps(alone, joined_alone, joined_alone + window)
    print(f"{args.streams} streams of {args.max_tokens} tokens; a {args.long_tokens}-word prompt joins "
          f"{args.join_after} s in and waits {window:.2f} s for its first token")
    print("| running streams, time between tokens (ms) | median | p99 | max |\n|---|---|---|---|")
    for name, g in (("alone", g_alone), ("while the long prompt is prefilled", g_long)):
        print(f"| {name} | {1e3 * pct(g, 0.5):.0f} | {1e3 * pct(g, 0.99):.0f} | {1e3 * max(g):.0f} |")
    ratio = pct(g_long, 0.99) / pct(g_alone, 0.99)
    print(f"p99 ratio: {ratio:.2f}x")
    print(json.dumps({"streams": args.streams, "long_prompt_words": args.long_tokens,
                      "long_prompt_first_token_s": window, "p99_gap_alone_s": pct(g_alone, 0.99),
                      "p99_gap_with_long_s": pct(g_long, 0.99), "p99_ratio": ratio,
                      "median_gap_alone_s": pct(g_alone, 0.5), "median_gap_with_long_s": pct(g_long, 0.5)}))
finally:
    server.terminate()
    server.wait()
