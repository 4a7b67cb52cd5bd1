#!/usr/bin/env bash
# Every side-by-side throughput comparison in one run, on this machine's 2 cores:
#   1. a training step vs PyTorch eager, fp32 and bf16 autocast (bench/train_vs_torch.py), with GFLOP/s
#      and the fraction of each side's measured matmul ceiling, on the bench config (6 × 384) and on
#      the speedrun's small preset (6 × 256, 8/4 heads, vocab 2,048, batch 16); the matmul kernel
#      that ran (amx-bf16, avx512-bf16, f32 and its SIMD level) is in each row's name;
#   2. tokenizer encode vs HF `tokenizers` and `tiktoken` on the same 8,192-token vocabulary, and BPE
#      training vs HF `tokenizers` (bench/tokenize_peers.py);
#   3. prefill and decode vs llama.cpp on SmolLM2-135M-Instruct Q4_1 (bench/gguf_vs_llamacpp.sh).
#   bench/compare.sh [train|tokenize|generate ...]     (default: all three; needs pip and npm)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(train tokenize generate)
cargo build --release --quiet
B="$ROOT/target/release/chatforge"
export RAYON_NUM_THREADS=2
need() { python3 -c "import $1" 2>/dev/null || python3 -m pip install --quiet "$2"; }
for part in "${PARTS[@]}"; do
  case $part in
    train)
      need torch torch
      echo "## Training step vs PyTorch (bench config)"
      python3 bench/train_vs_torch.py --threads 2 --steps 10
      echo "## Training step vs PyTorch (the speedrun's small preset)"
      python3 bench/train_vs_torch.py --threads 2 --steps 10 --width 256 --heads 8 --kv-heads 4 \
        --ffn 704 --vocab 2048 --batch 16
      ;;
    tokenize)
      need tokenizers tokenizers
      need tiktoken tiktoken
      echo "## Tokenizer vs HF tokenizers and tiktoken"
      # About 20 MB of English, Chinese and code-like text: the shared samples when present, else
      # the built-in curriculum, repeated.
      if [ -d ../shared/data/text ]; then
        for f in ../shared/data/text/*.txt; do cat "$f"; printf '\n\n'; done > "$W/one.txt"
      else
        $B curriculum --out "$W/cur" > /dev/null
        cp "$W/cur/pretrain_train.txt" "$W/one.txt"
      fi
      for _ in 1 2 3 4 5; do cat "$W/one.txt"; done > "$W/docs.txt"
      $B tokenizer train --input "$W/one.txt" --vocab-size 8192 --out "$W/tok" > /dev/null
      $B bench tokenize --tokenizer "$W/tok" --input "$W/docs.txt" --train-vocab 8192 --json > "$W/ours.json"
      python3 bench/tokenize_peers.py "$W/tok/tokenizer.json" "$W/docs.txt" 8192 > "$W/peers.json"
      python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
o, p = json.load(open(f"{w}/ours.json")), json.load(open(f"{w}/peers.json"))
print(f"{o['megabytes']:.1f} MB, {o['documents']:,} documents, vocabulary 8,192, 2 threads")
print("| | encode MB/s | BPE training to 8,192 (s) |\n|---|---|---|")
print(f"| chatforge | {o['encode_mb_per_second']:.2f} | {o['train_seconds']:.2f} |")
print(f"| HF tokenizers {p['hf_tokenizers_version']} | {p['hf_encode_mb_per_second']:.2f} | {p['hf_train_seconds']:.2f} |")
print(f"| tiktoken {p['tiktoken_version']} | {p['tiktoken_encode_mb_per_second']:.2f} | (no trainer) |")
print(f"| chatforge / HF tokenizers | {o['encode_mb_per_second'] / p['hf_encode_mb_per_second']:.2f}x | "
      f"{p['hf_train_seconds'] / o['train_seconds']:.2f}x |")
print(f"| chatforge / tiktoken | {o['encode_mb_per_second'] / p['tiktoken_encode_mb_per_second']:.2f}x | |")
print(f"tiktoken gives HF's ids on {100 * p['tiktoken_documents_identical_to_hf']:.1f}% of documents")
PY
      ;;
    generate)
      echo "## Prefill and decode vs llama.cpp"
      bash bench/gguf_vs_llamacpp.sh
      ;;
    *) echo "unknown part $part (train, tokenize or generate)" >&2; exit 2 ;;
  esac
done
