"""Compare the runs of ``examples/multi_gpu.sh``: one process against DDP and FSDP2 on N GPUs.

``python benchmarks/multi_gpu_summary.py RUNS NPROC [--meta FILE] [--command CMD] [--out PATH]``
reads RUNS/{one,ddp,fsdp}/log.jsonl and writes PATH.json (tokens/s, speedups, the relative loss
difference to the one-process run at every step) and PATH.png (loss curves and that difference).
``--meta`` takes device and versions from an earlier JSON (to redraw a GPU run elsewhere).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

MODES = ("one", "ddp", "fsdp")


def tokens_per_s(rows: list[dict]) -> float:
    """Steady state: the first 2 steps (compilation, autotuning) left out."""
    a, b = rows[1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"])


def summarize(runs: str, nproc: int, meta: dict, command: str) -> dict:
    from nsa.apps.train import read_log

    logs = {m: read_log(os.path.join(runs, m)) for m in MODES}
    res = {"nproc": nproc, "steps": len(logs["one"]), "command": command, **meta,
           "tokens_per_s": {m: round(tokens_per_s(r)) for m, r in logs.items()},
           "loss": {m: [r["loss"] for r in rows] for m, rows in logs.items()}}
    for m in ("ddp", "fsdp"):
        rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(logs["one"], logs[m])]
        res[f"{m}_rel_loss_diff"] = rel
        res[f"{m}_rel_loss_diff_first_last"] = [rel[0], rel[-1]]
        res[f"{m}_max_rel_loss_diff"] = max(rel)
        res[f"{m}_speedup"] = res["tokens_per_s"][m] / res["tokens_per_s"]["one"]
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = res["nproc"]
    labels = {"one": "1 process", "ddp": f"DDP x{n}", "fsdp": f"FSDP2 x{n}"}
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4))
    for m in MODES:
        a0.plot(range(1, res["steps"] + 1), res["loss"][m], lw=1, ls="-" if m == "one" else "--",
                label=f"{labels[m]}: {res['tokens_per_s'][m]:,} tok/s")
    a0.set(xlabel="step", ylabel="training loss", yscale="log")
    a0.legend(fontsize=8)
    for m in ("ddp", "fsdp"):
        a1.plot(range(1, res["steps"] + 1), [max(x, 1e-9) for x in res[f"{m}_rel_loss_diff"]], lw=1,
                label=labels[m])
    a1.set(xlabel="step", ylabel="|loss - loss(1 process)| / loss", yscale="log")
    a1.legend(fontsize=8)
    fig.suptitle(f"same global batch; {res.get('device', '')}, torch {res.get('torch', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs")
    p.add_argument("nproc", type=int)
    p.add_argument("--meta", help="take device / torch / triton / date from this JSON")
    p.add_argument("--command", default="", help="the command that made the runs (recorded)")
    p.add_argument("--out", help="output path without extension (default RUNS/multi_gpu)")
    a = p.parse_args(argv)
    if a.meta:
        with open(a.meta) as f:
            old = json.load(f)
        meta = {k: old[k] for k in ("device", "torch", "triton", "date") if k in old}
    else:
        import torch
        meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:  # CPU machines need not have it
            pass
    res = summarize(a.runs, a.nproc, meta, a.command)
    out = a.out or os.path.join(a.runs, "multi_gpu")
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, out + ".png")
    print(json.dumps({k: v for k, v in res.items() if k not in ("loss", "ddp_rel_loss_diff", "fsdp_rel_loss_diff")},
                     indent=1))


if __name__ == "__main__":
    main()
