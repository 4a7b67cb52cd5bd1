#!/usr/bin/env bash
# PPO, DPO and GRPO from the same SFT model of a speedrun, measured the same way on held-out
# curriculum prompts (reward-model score, checker accuracy, refusals, KL to the SFT model).
#   bench/rlhf_compare.sh runs/speedrun [STEPS]
# Needs a finished `chatforge speedrun` directory (its sft/, reward/ and data/).
set -euo pipefail
RUN=${1:?usage: bench/rlhf_compare.sh SPEEDRUN_DIR [STEPS]}
STEPS=${2:-120}
B=${CHATFORGE:-target/release/chatforge}
[ -x "$B" ] || cargo build --release
D=$RUN/data
OUT=$RUN/compare
mkdir -p "$OUT"
common=(--policy "$RUN/sft" --reward "$RUN/reward" --eval-prompts "$D/rl_prompts_heldout.jsonl"
        --eval-samples 128 --max-new-tokens 96 --steps "$STEPS" --eval-every "$STEPS" --weight-decay 0 --resume)
[ -f "$OUT/ppo.json" ]  || $B rlhf --algo ppo  --prompts "$D/rl_prompts_train.jsonl" --prompt-baseline --rollout-prompts 16 --group-size 4 \
                               --lr 3e-5 --warmup-steps 2 --minibatch 16 --out "$OUT/ppo" "${common[@]}" > "$OUT/ppo.json"
[ -f "$OUT/dpo.json" ]  || $B rlhf --algo dpo  --prefs "$D/prefs_pairs_train.jsonl" --val-prefs "$D/prefs_pairs_heldout.jsonl" \
                               --lr 1e-5 --out "$OUT/dpo" "${common[@]}" > "$OUT/dpo.json"
[ -f "$OUT/grpo.json" ] || $B rlhf --algo grpo --prompts "$D/rl_prompts_train.jsonl" --rollout-prompts 4 --group-size 4 \
                               --lr 2e-5 --out "$OUT/grpo" "${common[@]}" > "$OUT/grpo.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = ["reward", "accuracy", "kl", "refusal_rate_harmful", "false_refusal_rate_benign", "stops_at_end_of_turn", "length"]
runs = {a: json.load(open(f"{out}/{a}.json")) for a in ["ppo", "dpo", "grpo"]}
print("| metric | SFT | PPO | DPO | GRPO |\n|---|---|---|---|---|")
for k in rows:
    sft = runs["ppo"]["eval_before"].get(k)
    cells = [runs[a]["eval_after"].get(k) for a in ["ppo", "dpo", "grpo"]]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"| {k} | {fmt(sft)} | " + " | ".join(fmt(c) for c in cells) + " |")
print("| seconds | | " + " | ".join(f"{runs[a]['seconds']:.0f}" for a in ["ppo", "dpo", "grpo"]) + " |")
PY
