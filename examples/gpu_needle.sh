#!/usr/bin/env bash
# The GPU needle experiment (one H100, about 6 minutes): train NSA and window-only attention
# from the same config for the same steps on the embedded passkey task, then evaluate both on
# a grid of context lengths x needle depths. Training throughput per attention backend is
# measured first at one fixed shape. Writes everything under ${OUT:-runs/gpu}.
#   bash examples/gpu_needle.sh [preset] [seq_len] [steps] [batch]
# Defaults: tiny preset, lengths 256..2048, 2000 steps; step 2 is then the command behind
# benchmarks/results/needle_gpu_h100.json.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PRESET=${1:-tiny}
SEQ=${2:-2048}
STEPS=${3:-2000}
BATCH=${4:-16}
mkdir -p "$OUT"
rm -rf /tmp/tput_* /tmp/needle_run  # runs of an earlier call: train refuses to overwrite them
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
COMMON="--preset $PRESET --seq-len $SEQ --batch-size $BATCH --dtype bfloat16 --save-every 0"
tput() {  # tokens/s of a training log, its first 2 steps (compilation, autotuning) left out
    python3 - "$1" "$2" <<'PY' | tee -a "$OUT/throughput.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
a, b = rows[1], rows[-1]
print(f"{sys.argv[2]:>24}: {(b['tokens'] - a['tokens']) / (b['seconds'] - a['seconds']):>12,.0f} tokens/s")
PY
}
python3 -m nsa info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/info.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/info.txt"
# 1. training throughput per backend at one fixed shape (20 steps each)
for spec in "nsa backend=auto" "nsa backend=torch" "full backend=auto" "window backend=auto"; do
    set -- $spec
    python3 -m nsa train $COMMON --min-seq-len "$SEQ" --attention "$1" --set "$2" --steps 20 --warmup 2 --eval-every 0 \
        --no-needle --out "/tmp/tput_$1_$2" >/dev/null 2>"/tmp/err_$1_$2.txt" && tput "/tmp/tput_$1_$2/log.jsonl" "$spec" \
        || { echo "$spec failed:"; tail -3 "/tmp/err_$1_$2.txt"; }
done
# 2. NSA and window-only, lengths drawn from [256, SEQ] per step, then the needle grid
python3 -m nsa train $COMMON --min-seq-len 256 --attention nsa,window --steps "$STEPS" --eval-every 250 \
    --out /tmp/needle_run --contexts "$SEQ,$((2 * SEQ)),$((4 * SEQ)),$((8 * SEQ))" --samples 8 2>&1 \
    | tr '\r' '\n' | grep -av 'it/s\|s/it\|step/s\|cell' | tee "$OUT/train.txt"
cp /tmp/needle_run/needle.json "$OUT/needle_gpu.json"; cp /tmp/needle_run/needle.png "$OUT/needle_gpu.png"
for k in nsa window; do cp "/tmp/needle_run/$k/log.jsonl" "$OUT/log_$k.jsonl"; done
