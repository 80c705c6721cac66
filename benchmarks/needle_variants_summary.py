"""Put several GPU needle runs of one session side by side: mean accuracy over depths per context.

``python benchmarks/needle_variants_summary.py DIR --out PATH [--meta FILE]`` reads every
``DIR/needle_NAME.json`` written by ``nsa needle`` and writes PATH.json (each run's grid, its
mean over depths and the number of needles it missed at 4k-16k) and PATH.png (one line per run,
the window-only baseline dashed). The recipes (commands) of the runs go in ``--meta``: a JSON
object whose "runs" maps NAME (and KIND-only for a baseline panel, e.g. window-only) to a
description; its other keys (device, versions, date) are copied.
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def summarize(folder: str, meta: dict) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "needle_*.json"))):
        name = os.path.basename(path)[len("needle_"):-len(".json")]
        d = json.load(open(path))
        for kind, m in d["models"].items():
            key = name if kind == "nsa" else f"{kind}-only"
            acc = m["accuracy"]  # [contexts][depths]
            missed = sum(round((1 - a) * d["samples"]) for c, row in zip(d["contexts"], acc)
                         if 4096 <= c <= 16384 for a in row)
            recipe = meta.get("runs", {}).get(key, "")  # NAME, or KIND-only for a baseline panel
            runs[key] = {"recipe": recipe, "kind": kind, "contexts": d["contexts"],
                         "depths": d["depths"], "samples": d["samples"], "accuracy": acc,
                         "mean_over_depths": [sum(r) / len(r) for r in acc], "missed_4k_16k": missed}
    return {**{k: v for k, v in meta.items() if k != "runs"}, "runs": runs}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in res["runs"].items():
        style = "--" if r["kind"] != "nsa" else "-"
        ax.plot(r["contexts"], r["mean_over_depths"], style, marker="o", label=f"{name}: {r['missed_4k_16k']} missed at 4k-16k")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle accuracy (mean over 5 depths)")
    ax.set_title(f"needle, {next(iter(res['runs'].values()))['samples']} needles per cell; {res.get('device', '')}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.png")
    ap.add_argument("--meta", default=None, help="JSON file: device, versions, date, runs: {NAME: recipe}")
    a = ap.parse_args()
    meta = json.load(open(a.meta)) if a.meta else {}
    res = summarize(a.folder, meta)
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, a.out + ".png")
    for name, r in res["runs"].items():
        print(f"{name:28s} " + " ".join(f"{x:.2f}" for x in r["mean_over_depths"]) + f"  missed at 4k-16k: {r['missed_4k_16k']}")


if __name__ == "__main__":
    main()
