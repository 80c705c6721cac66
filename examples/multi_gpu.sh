#!/usr/bin/env bash
# Data-parallel training on N GPUs against one GPU with the same global batch (issue 5):
# the tiny NSA model on the embedded passkey task, once on 1 GPU, once with DDP and once with
# FSDP2 over NCCL (NVLink multicast off), then the loss curves compared step by step and the
# tokens/s of each run. Writes multi_gpu.json and multi_gpu.png under ${OUT:-runs/multi_gpu}.
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
python3 - "$OUT" "$NPROC" <<'PY'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from nsa.train import read_log

out, nproc = sys.argv[1], int(sys.argv[2])
logs = {m: read_log(f"{out}/{m}") for m in ("one", "ddp", "fsdp")}
def tok_s(rows):  # steady state: the first 2 steps (compilation, autotuning) left out
    a, b = rows[1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"])
res = {"nproc": nproc, "steps": len(logs["one"]), "tokens_per_s": {m: round(tok_s(r)) for m, r in logs.items()}}
for m in ("ddp", "fsdp"):
    rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(logs["one"], logs[m])]
    res[f"{m}_max_rel_loss_diff"] = max(rel)
    res[f"{m}_speedup"] = res["tokens_per_s"][m] / res["tokens_per_s"]["one"]
try:
    import torch
    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res["torch"] = torch.__version__
except Exception:
    pass
json.dump(res, open(f"{out}/multi_gpu.json", "w"), indent=1)
fig, ax = plt.subplots(figsize=(6, 4))
for m, label in (("one", "1 process"), ("ddp", f"DDP x{nproc}"), ("fsdp", f"FSDP2 x{nproc}")):
    ax.plot([r["step"] for r in logs[m]], [r["loss"] for r in logs[m]], label=f"{label}: {res['tokens_per_s'][m]:,} tok/s",
            lw=1, ls="-" if m == "one" else "--")
ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.set_yscale("log"); ax.legend(fontsize=8)
ax.set_title(f"same global batch; max relative loss difference DDP {res['ddp_max_rel_loss_diff']:.1e}, "
             f"FSDP2 {res['fsdp_max_rel_loss_diff']:.1e}", fontsize=8)
fig.tight_layout(); fig.savefig(f"{out}/multi_gpu.png", dpi=120)
print(json.dumps(res, indent=1))
PY
