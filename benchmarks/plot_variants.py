"""Bar chart of a before/after result file (rows with a "variant"): one group of bars per
variant, one bar per timed key (a key holding a dict, as decode_kernels' ``kernel_us``, is
stacked by its entries). Writes the PNG next to the JSON.

    python benchmarks/plot_variants.py benchmarks/results/bwd_group_major_h100.json nsa_fwd_ms nsa_bwd_ms
    python benchmarks/plot_variants.py benchmarks/results/decode_kernels_b1_h100.json kernel_us
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: str, keys: list[str]) -> str:
    with open(path) as f:
        out = json.load(f)
    rows = out["results"]
    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(keys) == 1 and isinstance(rows[0][keys[0]], dict):  # stacked parts
        parts = list(rows[0][keys[0]])
        bottom = [0.0] * len(rows)
        for part in parts:
            vals = [r[keys[0]].get(part, 0.0) for r in rows]
            ax.bar(names, vals, bottom=bottom, label=part.lstrip("_"))  # matplotlib hides "_" labels
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel(keys[0])
    else:
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ax.bar([j + i * width for j in range(len(rows))], [r[key] for r in rows], width, label=key)
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))], names)
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    m = out["meta"]
    ax.set_title(f"{m.get('gpu', '')}, {m.get('commit', '')}"[:110], fontsize=6)
    fig.tight_layout()
    png = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(png, dpi=120)
    return png


if __name__ == "__main__":
    print(plot(sys.argv[1], sys.argv[2:]))
