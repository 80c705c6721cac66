#!/usr/bin/env bash
# The GPU needle experiment (one H100, under 10 minutes): train the "small" preset (paper
# geometry l=32, d=16, l'=64, n=16, w=512) on the embedded passkey task with NSA and with
# window-only attention for the same number of steps, evaluate both from 2k to 64k tokens,
# and time training per backend. Writes everything under ${OUT:-runs/gpu}.
#   bash examples/gpu_needle.sh [train_seconds] [seq_len] [batch]
set -uo pipefail
OUT=${OUT:-runs/gpu}
BUDGET=${1:-300}
SEQ=${2:-2048}
BATCH=${3:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
COMMON="--preset small --seq-len $SEQ --batch-size $BATCH --dtype bfloat16 --save-every 0"
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
# 1. training throughput per backend at one fixed shape (8 steps each)
for spec in "nsa backend=auto" "nsa backend=torch" "full backend=auto" "window backend=auto"; do
    set -- $spec
    python3 -m nsa train $COMMON --min-seq-len "$SEQ" --attention "$1" --set "$2" --steps 8 --warmup 2 --eval-every 0 \
        --no-needle --out "/tmp/tput_$1_$2" >/dev/null 2>"/tmp/err_$1_$2.txt" && tput "/tmp/tput_$1_$2/log.jsonl" "$spec" \
        || { echo "$spec failed:"; tail -3 "/tmp/err_$1_$2.txt"; }
done
# 2. as many steps as NSA (Triton forward) does in the time budget; the same for window
STEPS=$(python3 -c "
import json; r=[json.loads(l) for l in open('/tmp/tput_nsa_backend=auto/log.jsonl')]
print(max(50, int($BUDGET / ((r[-1]['seconds'] - r[1]['seconds']) / (len(r) - 2)))))")
echo "training $STEPS steps" | tee -a "$OUT/info.txt"
python3 -m nsa train $COMMON --attention nsa,window --steps "$STEPS" --eval-every 100 --out "$OUT/run" \
    --contexts 2048,4096,8192,16384,32768,65536 --samples 8 --eval-batch 1 2>&1 \
    | tr '\r' '\n' | grep -v '^ *nsa:\|^ *window:\|needle grid:' | tee "$OUT/train.txt"
cp "$OUT/run/needle.json" "$OUT/needle_gpu.json"; cp "$OUT/run/needle.png" "$OUT/needle_gpu.png"
for k in nsa window; do cp "$OUT/run/$k/log.jsonl" "$OUT/log_$k.jsonl"; done
rm -rf "$OUT/run"
