#!/usr/bin/env bash
# Data-pipeline throughput on this machine, chatforge beside a peer, in one run:
#   bench/data_compare.sh [MEGABYTES]     (default 200; needs ../shared/data and pip)
# 1. generates a web-like JSONL corpus (bench/make_web_corpus.py) and the same as zstd Parquet;
# 2. times each chatforge data stage alone and the fused `data prepare` (clean + quality filter +
#    dedup + mix), from JSONL and from Parquet, with peak memory;
# 3. runs the peer, datasketch MinHashLSH, on the first 20 MB and prints the dedup speed ratio.
set -euo pipefail
MB=${1:-200}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED="$ROOT/../shared/data/text"
[ -d "$SHARED" ] || { echo "needs ../shared/data (not found)"; exit 1; }
python3 -c "import datasketch, pyarrow" 2>/dev/null || pip install --quiet datasketch pyarrow
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
B="$ROOT/target/release/chatforge"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cd "$W"
python3 "$ROOT/bench/make_web_corpus.py" web.jsonl "$MB"
python3 -c "
import pyarrow as pa, pyarrow.json as pj, pyarrow.parquet as pq
pq.write_table(pj.read_json('web.jsonl'), 'web.parquet', compression='zstd', row_group_size=10000)"
head -c 20000000 web.jsonl | head -n -1 > web20.jsonl
$B data quality-train --good "$SHARED/wiki_demo.txt" "$SHARED/tinystories_head.txt" "$SHARED/zh_classics.txt" \
  --bad "$SHARED/c4_demo.jsonl" --out q.json > /dev/null
$B tokenizer train --input "$SHARED/tinystories_head.txt" "$SHARED/zh_classics.txt" --vocab-size 4096 --out tok > /dev/null

measure() { # label, command...: prints label, MB/s from the report JSON, seconds, peak MB
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o time.txt "$@" > out.json 2> err.txt || { cat err.txt; exit 1; }
  read -r secs kb < time.txt
  mbs=$(python3 -c "import json,sys; print(round(json.load(open('out.json'))['megabytes_per_second'],1))" 2>/dev/null || echo "-")
  printf "%-44s %8s %9s %9s\n" "$label" "$mbs" "$secs" "$((kb / 1024))"
}
printf "%-44s %8s %9s %9s\n" "chatforge stage ($MB MB web-like JSONL, 2 cores)" "MB/s" "seconds" "peak MB"
measure "data clean" $B data clean --input web.jsonl --out c.jsonl
measure "data quality-filter" $B data quality-filter --model q.json --input web.jsonl --out f.jsonl
measure "data dedup" $B data dedup --input web.jsonl --out d.jsonl
measure "data dedup (20 MB, for the peer)" $B data dedup --input web20.jsonl --out d20.jsonl
for fmt in jsonl parquet; do
  cat > p.toml <<TOML
out = "prep_$fmt"
[quality]
model = "q.json"
[tokenizer]
path = "tok"
[[source]]
name = "web"
files = ["web.$fmt"]
weight = 1.0
quality_filter = QF
TOML
  for qf in true false; do
    sed "s/QF/$qf/" p.toml > p_$qf.toml
    rm -rf "prep_$fmt"
    /usr/bin/time -f "%e %M" -o time.txt $B data prepare --config p_$qf.toml > /dev/null 2> err.txt || { cat err.txt; exit 1; }
    read -r secs kb < time.txt
    mbs=$(python3 -c "import json; r=json.load(open('prep_$fmt/prepare_report.json')); print(round(r['sources'][0]['megabytes_per_second'],1))")
    printf "%-44s %8s %9s %9s\n" "prepare $fmt: clean+$( [ $qf = true ] && echo filter+ )dedup (+mix)" "$mbs" "$secs" "$((kb / 1024))"
  done
done
echo
ours=$($B data dedup --input web20.jsonl --out d20.jsonl | python3 -c "import json,sys; print(json.load(sys.stdin)['megabytes_per_second'])")
peer=$(python3 "$ROOT/bench/dedup_peer.py" web20.jsonl)
echo "peer: $peer"
python3 -c "import json; p=json.loads('''$peer'''); print(f'dedup speed, chatforge / datasketch: {float($ours)/p[\"megabytes_per_second\"]:.1f}x')"
