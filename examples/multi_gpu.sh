#!/usr/bin/env bash
# Data-parallel training on N GPUs against one GPU with the same global batch (issue 5):
# the tiny NSA model on the embedded passkey task, once on 1 GPU, once with DDP and once with
# FSDP2 over NCCL (NVLink multicast off), then the loss curves compared step by step and the
# tokens/s of each run (benchmarks/multi_gpu_summary.py). Writes multi_gpu.{json,png} under
# ${OUT:-runs/multi_gpu}. EXTRA="--preset small" (or any train options) is appended to each run.
#   bash examples/multi_gpu.sh [nproc=2] [steps=300] [seq_len=2048] [batch=16]
# DEVICE=cpu runs the same with gloo processes on the CPU (a smoke test of the script).
set -euo pipefail
NPROC=${1:-2}
STEPS=${2:-300}
SEQ=${3:-2048}
BATCH=${4:-16}
OUT=${OUT:-runs/multi_gpu}
DEVICE=${DEVICE:-cuda}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
ARGS=(--preset tiny --attention nsa --seq-len "$SEQ" --batch-size "$BATCH" --steps "$STEPS"
      --eval-every 0 --save-every 0 --no-needle --device "$DEVICE" ${EXTRA:-})
[ "$DEVICE" = cuda ] && ARGS+=(--dtype bfloat16)
rm -rf "$OUT" && mkdir -p "$OUT"
python3 -m nsa train "${ARGS[@]}" --out "$OUT/one" > "$OUT/one.txt" 2>&1
for mode in ddp fsdp; do
    python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m nsa train "${ARGS[@]}" \
        $([ $mode = fsdp ] && echo --fsdp) --out "$OUT/$mode" > "$OUT/$mode.txt" 2>&1
done
python3 "$(dirname "$0")/../benchmarks/multi_gpu_summary.py" "$OUT" "$NPROC" \
    --command "bash examples/multi_gpu.sh $* (DEVICE=$DEVICE EXTRA=${EXTRA:-})"
