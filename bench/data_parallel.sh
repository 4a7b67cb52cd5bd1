#!/usr/bin/env bash
# Data-parallel pretraining on this machine: 1 process × all cores against N ranks × 1 thread
# (mpirun), the speedrun's small preset on the curriculum, the same global batch; prints tokens/s,
# the ratio, and the share of each step spent summing gradients across ranks.
#   bench/data_parallel.sh [RANKS] [STEPS]   (default: 2 ranks, 30 steps; needs Open MPI or MPICH)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RANKS=${1:-2}
STEPS=${2:-30}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
CARGO_TARGET_DIR=target/mpi cargo build --release --quiet --features mpi --bin chatforge
B="$ROOT/target/mpi/release/chatforge"
$B curriculum --out "$W/cur" > /dev/null 2>&1
$B tokenizer train --input "$W/cur/pretrain_train.txt" --vocab-size 2048 --out "$W/tok" > /dev/null 2>&1
$B tokenize --tokenizer "$W/tok" --input "$W/cur/pretrain_train.txt" --out "$W/shards" > /dev/null
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CORES=$(nproc)
ARGS=(pretrain --data "$W/shards" --batch-size 16 --seq-len 256 --steps "$STEPS" --eval-every 100000
  --eval-tokens 4096)
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
RAYON_NUM_THREADS=$CORES $B "${ARGS[@]}" --out "$W/one" 2> "$W/one.log" > /dev/null
grep -o "matmuls on [^,]*" "$W/one.log" | head -1
mpirun -np "$RANKS" "$B" "${ARGS[@]}" --out "$W/many" 2> "$W/many.log" > /dev/null
ONE=$(field "$W/one/report.json" tokens_per_second)
MANY=$(field "$W/many/report.json" tokens_per_second)
SUM=$(field "$W/many/report.json" all_reduce_seconds)
SECS=$(field "$W/many/report.json" seconds)
python3 - "$CORES" "$RANKS" "$ONE" "$MANY" "$SUM" "$SECS" <<'EOF'
import sys
cores, ranks, one, many, summing, secs = sys.argv[1:]
one, many, summing, secs = map(float, (one, many, summing, secs))
print(f"| setup | tokens/s |\n|---|---|")
print(f"| 1 process × {cores} threads | {one:,.0f} |")
print(f"| {ranks} ranks × {max(1, int(cores) // int(ranks))} thread(s), mpirun | {many:,.0f} |")
print(f"ratio (ranks / one process): {many / one:.2f}×; summing gradients: {100 * summing / secs:.1f}% of the run")
EOF
