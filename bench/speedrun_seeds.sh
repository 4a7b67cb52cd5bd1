#!/usr/bin/env bash
# How much the speedrun's headline numbers move between seeds, the spread a change must beat:
#   bench/speedrun_seeds.sh N [PRESET] [OUT]
# runs `chatforge speedrun --seed S` for S = 1..N (PRESET small by default; tiny checks the script
# in about a minute per seed) into OUT/seed_S (resuming any that stopped), then prints one table:
# each headline rate per stage, its mean, the standard deviation across seeds, and the smallest and
# largest value. With N = 2 the spread is only a hint; the report's intervals and paired tests
# are the per-run measure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${1:?usage: bench/speedrun_seeds.sh N [PRESET] [OUT]}
PRESET=${2:-small}
OUT=${3:-$ROOT/runs/seeds-$PRESET}
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
B="$ROOT/target/release/chatforge"
mkdir -p "$OUT"
for s in $(seq 1 "$N"); do
  echo "== seed $s of $N ($PRESET preset) -> $OUT/seed_$s" >&2
  start=$(date +%s)
  "$B" speedrun --preset "$PRESET" --seed "$s" --out "$OUT/seed_$s" > "$OUT/seed_$s.log" 2>&1 \
    || { echo "seed $s failed; see $OUT/seed_$s.log" >&2; exit 1; }
  echo "   $(( $(date +%s) - start )) s" >&2
done
python3 - "$OUT" "$N" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
reports = [json.load(open(f"{out}/seed_{s}/report.json")) for s in range(1, n + 1)]
rows = [
    ("checker accuracy", "curriculum", "accuracy"),
    ("  fact questions", "curriculum", "accuracy/fact"),
    ("  arithmetic (direct)", "curriculum", "accuracy/arithmetic"),
    ("  arithmetic (step by step)", "curriculum", "accuracy/arithmetic_steps"),
    ("  chicken-rabbit (step by step)", "curriculum", "accuracy/chicken_rabbit"),
    ("  chicken-rabbit (direct)", "curriculum", "accuracy/chicken_rabbit_direct"),
    ("  translation", "curriculum", "accuracy/translation"),
    ("  sentiment", "curriculum", "accuracy/sentiment"),
    ("refuses harmful requests", "curriculum", "refusal_rate_harmful"),
    ("false refusals", "curriculum", "false_refusal_rate_benign"),
    ("stops at end of turn", "curriculum", "stops_at_end_of_turn"),
    ("bits per byte", "bpb", "bits_per_byte"),
]
def line(label, values):
    v = [x for x in values if x is not None]
    if not v:
        return f"| {label} | - | - | - | - |"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"| {label} | {statistics.mean(v):.3f} | {sd:.3f} | {min(v):.3f} | {max(v):.3f} |"
print(f"{n} seeds of the speedrun ({reports[0].get('preset', '?')} preset)\n")
print("| metric | mean | sd across seeds | min | max |\n|---|---|---|---|---|")
for stage in ["base", "sft", "rlhf", "rlvr", "final_index"]:
    for label, task, key in rows:
        values = [r["eval"].get(stage, {}).get(task, {}).get(key) for r in reports]
        if any(x is not None for x in values):
            print(line(f"{stage}: {label}", values))
print(line("reward model: held-out pairwise accuracy",
           [r["reward_model"].get("heldout_accuracy") for r in reports]))
PY
