"""``nsa needle``: needle-in-a-haystack retrieval of trained models, a grid of context lengths x
needle depths, printed and drawn as a heatmap (one panel per model).

The grid's needles are drawn from :class:`nsa.apps.data.PasskeyTask` with a fixed seed
(:data:`NEEDLE_SEED`): every run, and every model in a run, answers the same questions.
"""

from __future__ import annotations

import argparse
import json

import torch

from .checkpoint import load_checkpoint
from .data import PasskeyTask, _rng
from .runtime import Dist, comma_list, fraction, out_stem, positive_int, resolve_device

HELP = {"needle": "needle-in-a-haystack accuracy heatmap: NSA vs baselines"}


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name != "needle":
        raise ValueError(f"nsa.apps.needle has no command {name!r}")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders, .safetensors files or "
                                                  "transformers folders, one heatmap panel each")
    p.add_argument("--out", default="runs/needle", help="writes OUT.png and OUT.json (default runs/needle)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_grid_arguments(p)


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """The grid's options (``nsa needle``, and ``nsa train``'s grid after training)."""
    p.add_argument("--contexts", type=comma_list(positive_int), default=None,
                   help="comma-separated context lengths (default: from a third to twice the "
                        "training length)")
    p.add_argument("--depths", type=comma_list(fraction), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="comma-separated needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=positive_int, default=16, help="needles per grid cell (default 16)")
    p.add_argument("--eval-batch", type=positive_int, default=16, help="sequences per forward pass (default 16)")


def run(name: str, args) -> int:
    if name != "needle":
        raise ValueError(f"nsa.apps.needle has no command {name!r}")
    return cmd_needle(args)


NEEDLE_SEED = 1234  # the needle grid's samples: the same in every run


def needle_example(task: PasskeyTask, context_len: int, depth_index: int, depth: float, sample: int,
                   seed: int = NEEDLE_SEED):
    """Sample ``sample`` of the grid cell (context_len, depths[depth_index] = depth):
    (tokens, answer_start, key) of :meth:`PasskeyTask.example`."""
    return task.example(context_len, float(depth), _rng(seed, context_len, depth_index, sample))


@torch.no_grad()
def needle_accuracy(model, task: PasskeyTask, context_len: int, depths, *, samples: int, seed: int,
                    device, batch: int = 16) -> list[float]:
    """Fraction of needles whose whole pass key the model gets right, per depth.

    Exact match of the teacher-forced argmax at every answer digit: the same as greedy
    decoding of the answer (each greedy token equals the true digit iff it is the argmax
    given the true digits before it).
    """
    import numpy as np

    out = []
    for i, depth in enumerate(depths):
        rows = [needle_example(task, context_len, i, depth, j, seed) for j in range(samples)]
        a = rows[0][1]
        toks = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64)).to(device)
        hits = 0
        for b0 in range(0, samples, batch):
            x = toks[b0:b0 + batch]
            logits = model(x[:, :a + task.digits - 1])[:, a - 1:]
            hits += int((logits.argmax(-1) == x[:, a:a + task.digits]).all(-1).sum())
        out.append(hits / samples)
    return out


def needle_grid(models: dict, args, device) -> dict:
    """Accuracy of each model over ``args.contexts`` x ``args.depths`` (lists; contexts None:
    from a third to twice ``args.seq_len``)."""
    from tqdm import tqdm

    train_len = getattr(args, "seq_len", None) or 256
    contexts = args.contexts or sorted({max(128, train_len // 3), 2 * train_len // 3, train_len, 2 * train_len})
    depths = args.depths
    task = PasskeyTask(min(contexts), digits=getattr(args, "digits", None) or 5)
    result = {"contexts": contexts, "depths": depths, "samples": args.samples, "models": {}}
    with tqdm(total=len(models) * len(contexts), desc="needle grid", unit="cell",
              dynamic_ncols=True) as bar:
        for name, model in models.items():
            model.eval()
            acc = []
            for ctx in contexts:
                acc.append(needle_accuracy(model, task, ctx, depths, samples=args.samples, seed=NEEDLE_SEED,
                                           device=device, batch=args.eval_batch))
                bar.update(1)
            c = model.config
            result["models"][name] = {"accuracy": acc, "attention": c.attention, "window": c.attn.window,
                                      "config": c.to_dict()}
    return result


def report(grid: dict, stem: str) -> None:
    """Print the grid, the accuracy beyond the window, and write STEM.json and STEM.png (their
    folder must exist)."""
    print()
    for name, m in grid["models"].items():
        print(f"{name}: needle accuracy (rows: depth, columns: context length)")
        print("  depth " + "".join(f"{c:>7}" for c in grid["contexts"]))
        for i, dep in enumerate(grid["depths"]):
            print(f"  {dep:>5.2f} " + "".join(f"{m['accuracy'][j][i]:>7.2f}" for j in range(len(grid["contexts"]))))
        m["beyond_window"] = beyond_window_accuracy(grid, m)
    print("\nmean accuracy over depths (whole pass key right), by context length:")
    print("  " + " " * 8 + "".join(f"{c:>7}" for c in grid["contexts"]))
    for name, m in grid["models"].items():
        m["mean_over_depths"] = [sum(a) / len(a) for a in m["accuracy"]]
        print(f"  {name:>8}" + "".join(f"{a:>7.2f}" for a in m["mean_over_depths"]))
    print("accuracy on needles beyond the window (all cells where the needle is > window + 20 "
          "tokens before the question):")
    for name, m in grid["models"].items():
        print(f"  {name:>8}: {m['beyond_window']:.3f}")
    with open(stem + ".json", "w") as f:
        json.dump(grid, f, indent=1)
    plot_heatmap(grid, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")


def beyond_window_accuracy(grid: dict, m: dict) -> float:
    """Mean accuracy over the cells whose needle lies more than ``window`` tokens before
    the question (estimated from the depth; the question is ~45 bytes)."""
    accs = []
    for j, ctx in enumerate(grid["contexts"]):
        for i, dep in enumerate(grid["depths"]):
            if (1 - dep) * ctx > m["window"] + 20:
                accs.append(m["accuracy"][j][i])
    return sum(accs) / len(accs) if accs else float("nan")


def _short(n: int) -> str:
    """Tick label of a context length: 16384 -> "16k", 384 -> "384" (long labels overlap)."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_heatmap(grid: dict, path: str) -> None:
    """One panel per model: context length (x) by needle depth (y), accuracy as colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(grid["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        a = np.array(grid["models"][name]["accuracy"]).T  # [depth, context]
        im = ax.imshow(a, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(grid["contexts"])), [_short(c) for c in grid["contexts"]])
        ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name} (w={grid['models'][name]['window']})")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="retrieval accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def cmd_needle(args) -> int:
    out_stem(args.out, (".json", ".png"))  # before the grid's minutes, not after
    device = resolve_device(args.device, Dist())
    models = {}
    for path in args.checkpoints:
        m = load_checkpoint(path, device)
        if m.config.vocab_size != 256:
            raise ValueError(f"{path!r}: the needle task is byte-level (vocabulary 256), the model has "
                             f"{m.config.vocab_size} tokens")
        name = m.config.attention
        models[name if name not in models else f"{name}:{path}"] = m
    if args.contexts is None:
        args.seq_len = max(m.config.max_seq_len for m in models.values()) // 4
    report(needle_grid(models, args, device), args.out)
    return 0
