#!/usr/bin/env bash
# Data-parallel pretraining on this machine, side by side:
#   chatforge, 1 process × all cores;  chatforge, N ranks × 1 thread under mpirun;
#   PyTorch DistributedDataParallel (gloo), N processes × 1 thread (bench/ddp_vs_torch.py);
# on the speedrun's small preset (6 × 256, 8/4 heads, ffn 704, vocab 2,048, context 256) and the
# same global batch of 16; prints seconds per step, ratios, and chatforge's share of a run spent
# summing gradients across ranks. The matmul kernel that ran is printed.
#   bench/data_parallel.sh [RANKS] [STEPS]   (default 2 ranks, 20 steps; needs Open MPI or MPICH,
#                                             and pip for PyTorch)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RANKS=${1:-2}
STEPS=${2:-20}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
CARGO_TARGET_DIR=target/mpi cargo build --release --quiet --features mpi --bin chatforge
B="$ROOT/target/mpi/release/chatforge"
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet torch
$B curriculum --out "$W/cur" > /dev/null 2>&1
$B tokenizer train --input "$W/cur/pretrain_train.txt" --vocab-size 2048 --out "$W/tok" > /dev/null 2>&1
$B tokenize --tokenizer "$W/tok" --input "$W/cur/pretrain_train.txt" --out "$W/shards" > /dev/null
cat > "$W/small.json" <<'JSON'
{"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 6,
 "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
 "tie_word_embeddings": true}
JSON
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CORES=$(nproc)
ARGS=(pretrain --data "$W/shards" --config "$W/small.json" --batch-size 16 --seq-len 256
  --steps "$STEPS" --eval-every 100000 --eval-tokens 4096)
RAYON_NUM_THREADS=$CORES $B "${ARGS[@]}" --out "$W/one" 2> "$W/one.log" > /dev/null
KERNEL=$(grep -o "matmuls on [^,]*" "$W/one.log" | head -1)
mpirun -np "$RANKS" "$B" "${ARGS[@]}" --out "$W/ranks" 2> /dev/null > /dev/null
mpirun -np "$RANKS" "$B" "${ARGS[@]}" --precision f32 --out "$W/ranks32" 2> /dev/null > /dev/null
python3 bench/ddp_vs_torch.py --ranks "$RANKS" --steps "$STEPS" > "$W/torch.json"
python3 - "$W" "$CORES" "$RANKS" "$KERNEL" <<'PY'
import json, sys
w, cores, ranks, kernel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def step(run):
    r = json.load(open(f"{w}/{run}/report.json"))
    return 16 * 256 / r["tokens_per_second"], r
one, _ = step("one")
many, report = step("ranks")
many32, _ = step("ranks32")
torch = json.load(open(f"{w}/torch.json"))
print(f"chatforge {kernel}; PyTorch {torch['torch']}; global batch 16 × 256 tokens")
print("| setup | s/step | tokens/s |\n|---|---|---|")
for name, s in [(f"chatforge, 1 process × {cores} threads, auto", one),
                (f"chatforge, {ranks} ranks × 1 thread, auto", many),
                (f"chatforge, {ranks} ranks × 1 thread, f32", many32),
                (f"PyTorch DDP, {ranks} ranks × 1 thread, fp32", torch["fp32_s"]),
                (f"PyTorch DDP, {ranks} ranks × 1 thread, bf16 autocast", torch["bf16_s"])]:
    print(f"| {name} | {s:.3f} | {4096 / s:,.0f} |")
print(f"chatforge {ranks} ranks / 1 process: {one / many:.2f}×; chatforge auto / PyTorch DDP bf16: "
      f"{torch['bf16_s'] / many:.2f}×; chatforge f32 / PyTorch DDP fp32: {torch['fp32_s'] / many32:.2f}×")
print(f"summing gradients across ranks: {100 * report['all_reduce_seconds'] / report['seconds']:.1f}% of the run")
PY
