#!/usr/bin/env python3
"""Soak test for `chatforge serve`, on loopback only, bounded in time (standard library only).

Starts the server on a free port, then for --seconds runs --clients streaming clients: most
ask ordinary questions, one in eight sends prompts of about 2,000 tokens and one in eight hangs
up after the first streamed piece, while side threads send oversized bodies (4 MB limit: expect 413) and
dribble a body at one byte a second. Afterwards a sample of the ordinary requests is replayed one
at a time: each streamed text must start as the same prompt and seed start alone (no mixed-up
streams; later drift from batched kernels is counted apart). Prints a table (requests, errors, mismatched streams, latency, resident memory before,
at peak and after) and one JSON line; exits 1 on any error or mismatch.

usage: serve_soak.py --model MODEL [--bin target/release/chatforge] [--clients 64] [--seconds 60]
"""
import argparse, http.client, json, os, random, re, socket, subprocess, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/chatforge")
ap.add_argument("--model", required=True)
ap.add_argument("--clients", type=int, default=64)
ap.add_argument("--seconds", type=float, default=60)
ap.add_argument("--max-tokens", type=int, default=24)
ap.add_argument("--long-tokens", type=int, default=2000, help="length of the long prompts")
ap.add_argument("--verify", type=int, default=32, help="ordinary requests replayed alone")
ap.add_argument("--temperature", type=float, default=0.0,
                help="of the ordinary requests; greedy by default, so a replay alone must match")
args = ap.parse_args()

server = subprocess.Popen([args.bin, "serve", "--model", args.model, "--port", "0", "--queue", "256"],
                          stderr=subprocess.PIPE, text=True)
line = server.stderr.readline()
match = re.search(r"http://([\d.]+):(\d+)", line)
if not match:
    sys.exit(f"the server did not start: {line}")
HOST, PORT = match.group(1), int(match.group(2))
threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()


def rss_mb(field):
    with open(f"/proc/{server.pid}/status") as f:
        for row in f:
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024
    return float("nan")


def request(method, path, body=None, timeout=600):
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


MODEL = json.loads(request("GET", "/v1/models")[1].read())["data"][0]["id"]
SUBJECTS = ["cat", "dog", "duck", "horse", "cow", "sheep", "猫", "狗", "鸭子"]
QUESTIONS = ["How many legs does a {} have?", "What does a {} eat?", "Where does a {} live?",
             "{}有几条腿？", "Tell me a story about a {}."]
# About one token per word: a long prompt of --long-tokens words.
LONG = " ".join(random.Random(1).choice(["the", "cat", "sat", "on", "a", "warm", "mat", "and", "slept"])
                for _ in range(args.long_tokens))


def body_for(k, long=False):
    rng = random.Random(k)
    q = rng.choice(QUESTIONS).format(rng.choice(SUBJECTS))
    if long:
        q = LONG + "\n\n" + q
    return {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": k, "stream": True}


def stream(k, long=False, hang_up=False):
    """Streams request k; returns (status, text, seconds). With hang_up, closes after one piece."""
    start = time.time()
    conn, resp = request("POST", "/v1/chat/completions", body_for(k, long))
    if resp.status != 200:
        resp.read()
        conn.close()
        return resp.status, "", time.time() - start
    text = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            conn.close()
            return 500, "", time.time() - start
        piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
        if piece:
            text.append(piece)
            if hang_up:
                break
    conn.close()
    return 200, "".join(text), time.time() - start


counts = {"ordinary": 0, "long": 0, "hung_up": 0, "oversized": 0, "slow": 0}
ordinary, errors, latencies, lock = [], [], [], threading.Lock()
deadline = time.time() + args.seconds


def client(c):
    i = 0
    while time.time() < deadline:
        k = 1_000_000 * (c + 1) + i
        i += 1
        # One client in eight sends long prompts, one hangs up after the first piece.
        kind = {0: "long", 1: "hung_up"}.get(c % 8, "ordinary")
        try:
            status, text, seconds = stream(k, long=kind == "long", hang_up=kind == "hung_up")
            with lock:
                counts[kind] += 1
                if status != 200:
                    errors.append(f"{kind} request {k}: HTTP {status}")
                elif kind == "ordinary":
                    ordinary.append((k, text))
                    latencies.append(seconds)
        except Exception as e:
            with lock:
                errors.append(f"{kind} request {k}: {e!r}")


def oversized():
    while time.time() < deadline:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
        conn = http.client.HTTPConnection(HOST, PORT, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            status = conn.getresponse().status
        except (BrokenPipeError, ConnectionResetError):
            status = 413  # the server closed the connection after refusing the body
        conn.close()
        with lock:
            counts["oversized"] += 1
            if status != 413:
                errors.append(f"oversized body: HTTP {status}, expected 413")
        time.sleep(2)


def slow():
    while time.time() < deadline:
        s = socket.create_connection((HOST, PORT), timeout=30)
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 1000\r\n\r\n".encode())
        for _ in range(10):  # one byte a second, then give up
            if time.time() >= deadline:
                break
            s.sendall(b" ")
            time.sleep(1)
        s.close()
        with lock:
            counts["slow"] += 1


# Warm up with each kind of request once, so "before" includes the buffers a long prompt grows
# (matmul packing, attention scratch) and "after" shows whether the soak left anything behind.
for k in range(3):
    stream(k)
stream(3, long=True)
rss_before = rss_mb("VmRSS")
start = time.time()
threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
threads += [threading.Thread(target=oversized), threading.Thread(target=slow)]
for t in threads:
    t.start()
for t in threads:
    t.join()
soak_seconds = time.time() - start
time.sleep(5)
rss_after, rss_peak = rss_mb("VmRSS"), rss_mb("VmHWM")
sample = random.Random(0).sample(ordinary, min(args.verify, len(ordinary)))
# A stream mixed up with another request's reads like that request's reply alone. Batched
# decoding can also drift from single-row decoding (a quantized model's kernels round one row
# differently from many, so a near tie can go the other way): counted apart.
alone = {k: stream(k)[1] for k, _ in sample}
identical, drifted, mismatched = 0, [], []
for k, text in sample:
    if alone[k] == text:
        identical += 1
        continue
    own = len(os.path.commonprefix([alone[k], text]))
    other = max((len(os.path.commonprefix([a, text])), j) for j, a in alone.items()
                if j != k and body_for(j)["messages"] != body_for(k)["messages"]) if len(alone) > 1 else (0, k)
    if other[0] > own and other[0] >= 16:
        mismatched.append((k, text, alone[other[1]]))
    else:
        drifted.append(k)
health = request("GET", "/health")[1].status
server.terminate()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


total = sum(counts.values())
rows = [("requests (all kinds)", total), ("  ordinary streams", counts["ordinary"]),
        ("  ~%d-token prompts" % args.long_tokens, counts["long"]), ("  hung up mid-stream", counts["hung_up"]),
        ("  oversized bodies (413)", counts["oversized"]), ("  one byte a second", counts["slow"]),
        ("errors", len(errors)), ("replayed alone", len(sample)), ("  identical", identical),
        ("  its own reply, drifted", len(drifted)), ("  another request's reply", len(mismatched)),
        ("latency p50 s", f"{pct(latencies, .5):.2f}"), ("latency p99 s", f"{pct(latencies, .99):.2f}"),
        ("RSS before MB", f"{rss_before:.0f}"), ("RSS peak MB", f"{rss_peak:.0f}"),
        ("RSS after MB", f"{rss_after:.0f}"), ("/health after", health)]
print(f"soak: {args.clients} clients for {soak_seconds:.0f} s against {args.model}")
print("| measure | value |\n|---|---|")
for name, value in rows:
    print(f"| {name} | {value} |")
for e in errors[:5]:
    print("error:", e)
for k, a, b in mismatched[:3]:
    print(f"mismatch {k}: under load {a!r}\n            another request's reply alone {b!r}")
print(json.dumps({"clients": args.clients, "seconds": round(soak_seconds), "counts": counts, "errors": len(errors),
                  "mismatched": len(mismatched), "drifted": len(drifted), "identical": identical,
                  "verified": len(sample),
                  "latency_p50": round(pct(latencies, .5), 3), "latency_p99": round(pct(latencies, .99), 3),
                  "rss_before_mb": round(rss_before), "rss_peak_mb": round(rss_peak),
                  "rss_after_mb": round(rss_after), "health": health}))
sys.exit(1 if errors or mismatched or health != 200 else 0)
