#!/usr/bin/env python3
"""Writes a web-like JSONL corpus of about N MB for data-pipeline benchmarks: documents built from
random sentences of ../shared/data text (English and Chinese), with injected navigation lines,
timestamps and symbol rows, plus exact (3%) and near (3%) duplicates. Deterministic for a seed.

usage: make_web_corpus.py OUT.jsonl MEGABYTES [SEED]
"""
import json, os, random, re, sys

out, megabytes = sys.argv[1], float(sys.argv[2])
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "text")
if not os.path.isdir(root):
    sys.exit(f"needs ../shared/data/text (not found at {root})")

en, zh = [], []
for name in ["tinystories_head.txt", "wiki_demo.txt", "tinyshakespeare.txt"]:
    text = open(os.path.join(root, name), encoding="utf-8").read()
    en += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]
for line in open(os.path.join(root, "c4_demo.jsonl"), encoding="utf-8"):
    en += [s.strip() for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]) if len(s.strip()) > 20]
for name in ["zh_classics.txt", "zh_guwenguanzhi.txt"]:
    text = open(os.path.join(root, name), encoding="utf-8").read()
    zh += [s.strip() for s in re.split(r"(?<=[。！？])", text) if len(s.strip()) > 6]

NAV = ["Home | News | Sports | Weather | Contact Us", "Skip to content", "Sign in | Register | Cart (0)",
       "Copyright © 2021 Example Media. All rights reserved.", "Privacy Policy | Terms of Use"]


def document():
    zh_doc = rng.random() < 0.2
    pool = zh if zh_doc else en
    lines = []
    if rng.random() < 0.5:
        lines.append(rng.choice(NAV))
    if rng.random() < 0.3:
        lines.append(f"Posted on {rng.randint(1, 28)} March 20{rng.randint(10, 24)}, {rng.randint(0, 23)}:{rng.randint(10, 59)}")
    for _ in range(rng.randint(2, 8)):
        sep = "" if zh_doc else " "
        lines.append(sep.join(rng.choice(pool) for _ in range(rng.randint(2, 6))))
    if rng.random() < 0.3:
        lines.append("=" * rng.randint(5, 30))
    if rng.random() < 0.5:
        lines.append(rng.choice(NAV))
    return "\n".join(lines)


target = int(megabytes * 1e6)
written, recent = 0, []
with open(out, "w", encoding="utf-8") as f:
    while written < target:
        r = rng.random()
        if r < 0.03 and recent:
            doc = rng.choice(recent)
        elif r < 0.06 and recent:
            words = rng.choice(recent).split(" ")
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(["the", "a", "river", "house", "blue"])
            doc = " ".join(words)
        else:
            doc = document()
            recent.append(doc)
            if len(recent) > 2000:
                recent.pop(rng.randrange(len(recent)))
        line = json.dumps({"text": doc, "url": f"https://example.com/{written}"}, ensure_ascii=False)
        f.write(line + "\n")
        written += len(line.encode()) + 1
print(f"wrote {written / 1e6:.1f} MB to {out}")
