#!/usr/bin/env python3
"""Tokenizer peers on chatforge's own vocabulary: encode throughput of HF `tokenizers` (the same
tokenizer.json) and `tiktoken` (an Encoding built from the same vocabulary and split pattern), and
BPE training time of HF `tokenizers` to the same vocabulary size. Prints JSON.

    pip install tokenizers tiktoken
    python3 bench/tokenize_peers.py TOKENIZER.json DOCS.txt VOCAB [--threads 2]

DOCS.txt holds one document per blank-line-separated paragraph, as `chatforge bench tokenize` reads it.
"""
import argparse
import json
import os
import time


def bytes_to_unicode():
    """GPT-2's byte-to-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def median_time(f, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tokenizer")
    p.add_argument("docs")
    p.add_argument("vocab", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, Regex
    import tiktoken

    text = open(a.docs, encoding="utf-8").read()
    docs = [d for d in text.split("\n\n") if d.strip()]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    hf = Tokenizer.from_file(a.tokenizer)
    hf_s, hf_out = median_time(lambda: hf.encode_batch_fast(docs, add_special_tokens=False), a.repeats)
    hf_ids = [e.ids for e in hf_out]

    spec = json.load(open(a.tokenizer))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[ch] for ch in tok): i for tok, i in spec["model"]["vocab"].items()}
    pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    enc = tiktoken.Encoding("chatforge", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    tt_s, tt_ids = median_time(lambda: enc.encode_ordinary_batch(docs, num_threads=a.threads), a.repeats)
    same = sum(x == y for x, y in zip(hf_ids, tt_ids))

    trainer = trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=[t for t in special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fresh = Tokenizer(models.BPE())
    fresh.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    fresh.decoder = decoders.ByteLevel()
    t = time.perf_counter()
    fresh.train_from_iterator(docs, trainer)
    train_s = time.perf_counter() - t
    tokens = sum(len(i) for i in hf_ids)
    print(json.dumps({
        "documents": len(docs), "megabytes": mb, "tokens": tokens,
        "hf_tokenizers_version": __import__("tokenizers").__version__, "tiktoken_version": tiktoken.__version__,
        "hf_encode_mb_per_second": mb / hf_s, "tiktoken_encode_mb_per_second": mb / tt_s,
        "tiktoken_documents_identical_to_hf": same / max(len(docs), 1),
        "hf_train_seconds": train_s,
    }))


if __name__ == "__main__":
    main()
