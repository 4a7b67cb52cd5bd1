#!/usr/bin/env python3
"""Does a base model look things up in its context? The measurement behind docs/CURRICULUM.md's
reading attempts.

  bench/reading_probe.py probe --model RUN [--format reading|drill] [--passages 3]
                               [--keys invented|words] [--layout plain|labelled]
      Passages (or a drill's list) with facts drawn afresh, then a question; the log-likelihood of
      every candidate value (10 towns, or 8 jobs) decides the answer. Prints how often the right
      value wins, how often some value from the context wins, both rates for a blind pick, and
      how often a model that copies some value from the context without matching it is right.
  bench/reading_probe.py drills --out FILE [--keys invented|words] [--layout plain|labelled]
                                [--count 30000]
      Lookup drills as pretraining text ("Vifen Rusk, Karen Brisa\\nKaren: Brisa"), for
      `chatforge tokenize` and `chatforge pretrain`.

Needs target/release/chatforge (or --bin). The names, towns and jobs are the curriculum's
(src/data/curriculum/world.rs).
"""
import argparse, json, os, random, subprocess, sys, tempfile

SYLLABLES = ["Ka", "Lo", "Mi", "Ren", "Zu", "Ta", "Vi", "No", "Sel", "Dar", "Bo", "Fen"]
TOWNS = ["Velmora", "Ostrin", "Calder", "Brisa", "Tamsk", "Ulvany", "Pellow", "Quenby", "Rusk", "Haldon"]
JOBS = ["baker", "doctor", "farmer", "teacher", "painter", "pilot", "singer", "fisher"]
# One-token keys under the speedrun's tokenizer: the stories' names and objects.
WORDS = ["Lily", "Tom", "Mia", "Ben", "Anna", "Sam", "Lucy", "Max", "Emma", "Leo", "Zoe", "Jack",
         "Noah", "Ella", "Ryan", "Ivy", "ball", "kite", "book", "hat", "cake", "box", "cup", "key",
         "bag", "lamp", "pen", "shoe", "chair", "watch", "blanket", "bottle"]


def keys(kind):
    return [a + b.lower() for a in SYLLABLES for b in SYLLABLES] if kind == "invented" else WORDS


def reading_items(rng, n, passages):
    """`passages` people's passages, then a town or job question about one of them."""
    names = keys("invented")
    for k in range(n):
        people = [(p, rng.choice(TOWNS), rng.choice(JOBS), rng.randint(20, 79))
                  for p in rng.sample(names, passages)]
        doc = "\n".join(f"{p} lives in {t}. {p} is {a} years old. {p} works as a {j}."
                        for p, t, j, a in people)
        p, t, j, _ = rng.choice(people)
        if k % 2 == 0:
            yield f"{doc}\nQ: Where does {p} live?\nA: {p} lives in", TOWNS, t, [x[1] for x in people]
        else:
            yield f"{doc}\nQ: What is the job of {p}?\nA: {p} works as a", JOBS, j, [x[2] for x in people]


# Drill layouts: "plain" asks a key at the start of a line, so it is other tokens than the same key
# after ", " in the list (" Tom" against "Tom"); "labelled" puts a word before both, so a key is the
# same tokens wherever it stands.
LAYOUTS = {"plain": ("", ""), "labelled": ("List: ", "Ask ")}


def drill_items(rng, n, kind, layout):
    """Four keys with towns, the first asked back, then another one asked."""
    names = keys(kind)
    head, ask = LAYOUTS[layout]
    for _ in range(n):
        ks = rng.sample(names, 4)
        vs = [rng.choice(TOWNS) for _ in ks]
        ctx = head + ", ".join(f"{a} {b}" for a, b in zip(ks, vs)) + f"\n{ask}{ks[0]}: {vs[0]}\n"
        i = rng.randrange(1, 4)
        yield ctx + f"{ask}{ks[i]}:", TOWNS, vs[i], vs


def probe(args):
    rng = random.Random(args.seed)
    items = list(reading_items(rng, args.items, args.passages) if args.format == "reading"
                 else drill_items(rng, args.items, args.keys, args.layout))
    with tempfile.TemporaryDirectory() as tmp:
        tasks, answers = os.path.join(tmp, "probe.jsonl"), os.path.join(tmp, "scores.jsonl")
        with open(tasks, "w") as f:
            for ctx, cands, _, _ in items:
                for c in cands:
                    f.write(json.dumps({"context": ctx, "continuation": " " + c}) + "\n")
        run = subprocess.run([args.bin, "eval", "--model", args.model, "--base", "--task",
                              f"loglikelihood:{tasks}", "--answers", answers],
                             stdout=subprocess.DEVNULL)
        if run.returncode != 0:
            sys.exit(f"reading_probe: `chatforge eval` failed on {args.model} (its error is above)")
        scores = [json.loads(l)["loglikelihood"] for l in open(answers)]
    right = in_context = 0
    blind_right = blind_in = copy_right = 0.0
    at = 0
    for _, cands, answer, shown in items:
        s = scores[at:at + len(cands)]
        at += len(cands)
        best = cands[max(range(len(cands)), key=s.__getitem__)]
        right += best == answer
        in_context += best in shown
        blind_right += 1 / len(cands)
        blind_in += len(set(shown)) / len(cands)
        copy_right += 1 / len(set(shown))
    n = len(items)
    print(json.dumps({"model": args.model, "format": args.format, "keys": args.keys, "items": n,
                      "right": round(right / n, 3), "from_context": round(in_context / n, 3),
                      "blind_right": round(blind_right / n, 3),
                      "blind_from_context": round(blind_in / n, 3),
                      "copying_without_matching_right": round(copy_right / n, 3)}))


def drills(args):
    rng = random.Random(args.seed)
    ks = keys(args.keys)
    head, ask = LAYOUTS[args.layout]
    docs = []
    for _ in range(args.count):
        n = rng.randint(3, 6)
        names = rng.sample(ks, n)
        kind = rng.randrange(3)
        vals = [rng.choice(TOWNS) if kind == 0 else rng.choice(JOBS) if kind == 1
                else str(rng.randint(20, 79)) for _ in names]
        text = head + ", ".join(f"{k} {v}" for k, v in zip(names, vals))
        for _ in range(n):
            i = rng.randrange(n)
            text += f"\n{ask}{names[i]}: {vals[i]}"
        docs.append(text)
    with open(args.out, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    print(f"wrote {args.count} drills to {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--model", required=True)
    p.add_argument("--format", choices=["reading", "drill"], default="reading")
    p.add_argument("--keys", choices=["invented", "words"], default="invented")
    p.add_argument("--passages", type=int, default=3, help="people per reading item")
    p.add_argument("--layout", choices=list(LAYOUTS), default="plain")
    p.add_argument("--items", type=int, default=150)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--bin", default="target/release/chatforge")
    d = sub.add_parser("drills")
    d.add_argument("--out", required=True)
    d.add_argument("--keys", choices=["invented", "words"], default="invented")
    d.add_argument("--layout", choices=list(LAYOUTS), default="plain")
    d.add_argument("--count", type=int, default=30000)
    d.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    probe(args) if args.cmd == "probe" else drills(args)


if __name__ == "__main__":
    sys.exit(main())
