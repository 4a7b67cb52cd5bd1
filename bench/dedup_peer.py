#!/usr/bin/env python3
"""The peer for chatforge's duplicate removal: datasketch MinHash + MinHashLSH (pip `datasketch`)
with the same settings (100 permutations, Jaccard 0.8, character 5-gram shingles of lower-cased,
whitespace-collapsed text, exact duplicates by hash first). Prints one JSON line.

usage: dedup_peer.py IN.jsonl
"""
import hashlib, json, resource, sys, time

from datasketch import MinHash, MinHashLSH

start = time.time()
lsh = MinHashLSH(threshold=0.8, num_perm=100)
seen, docs, bytes_in, exact, near = set(), 0, 0, 0, 0
for line in open(sys.argv[1], encoding="utf-8"):
    text = json.loads(line)["text"]
    docs += 1
    bytes_in += len(text.encode())
    norm = " ".join(text.lower().split())
    key = hashlib.blake2b(norm.encode(), digest_size=8).digest()
    if key in seen:
        exact += 1
        continue
    m = MinHash(num_perm=100)
    m.update_batch([norm[i:i + 5].encode() for i in range(max(1, len(norm) - 4))])
    if lsh.query(m):
        near += 1
        continue
    seen.add(key)
    lsh.insert(str(docs), m)
seconds = time.time() - start
print(json.dumps({"peer": "datasketch MinHashLSH (1 process)", "documents_in": docs,
                  "exact_duplicates": exact, "near_duplicates": near, "seconds": round(seconds, 2),
                  "megabytes_per_second": round(bytes_in / 1e6 / seconds, 2),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
