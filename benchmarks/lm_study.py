"""The language-modelling study (docs/lm_study.md): NSA, full attention and window-only models of
one preset, trained for the same tokens on Python source (``nsa train --data python``: the
standard library and the installed packages; ``--data stdlib``: the standard library alone),
compared by validation loss against tokens and against wall-clock, and by loss at each token
position of the 8k window (does a model use context beyond its window?).

``python benchmarks/lm_study.py [--steps N] [--out RUNS] [TRAIN OPTIONS...]`` trains the three
models one after the other into RUNS/{nsa,full,window} (one ``nsa train`` each; any option this
script does not know is passed to it and overrides the defaults, e.g. ``--lr 2e-3`` or ``--set
n_layers=6``), then writes RESULTS.json and
RESULTS.png (``--results``, default benchmarks/results/lm_study_<gpu>). ``--resume`` continues
stopped runs and keeps finished ones; ``--plot-only`` redraws the results from the runs' logs.
``--smoke`` is a CPU setting of a few seconds (a tiny model, 112-token windows, ``--data stdlib``
unless given) that checks the whole pipeline.

The defaults are sized for one H100 or H200: the small preset, batch 8 x 8192 tokens, bf16, 2400
steps (157M tokens; ~9 minutes for the three on an H100), ``--data python`` (its size depends on the installed packages, which the corpus
record lists; the standard library alone was 9.2 MB on the GPU machine: 8.5 passes). Pick
``--steps`` from the slowest model's tokens/s (``nsa bench model-train --presets small --seqlens
8192 --batch 8``): a run takes steps * 8 * 8192 / (tokens/s) seconds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

KINDS = ("nsa", "full", "window")
LABELS = {"nsa": "NSA", "full": "full attention", "window": "window only"}
HERE = os.path.dirname(os.path.abspath(__file__))

# what `nsa train` gets, on the GPU and in the CPU smoke setting (--steps etc. are added)
GPU_ARGS = ["--preset", "small", "--seq-len", "8192", "--batch-size", "8", "--lr", "1e-3", "--warmup", "100",
            "--dtype", "bfloat16", "--device", "cuda", "--eval-windows", "32", "--eval-batch", "8",
            "--save-every", "200"]
SMOKE_ARGS = ["--preset", "tiny", "--seq-len", "112", "--batch-size", "4", "--warmup", "2",
              "--set", "d_model=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
              "--set", "head_dim=16", "--set", "window=16", "--set", "cmp_block=8", "--set", "cmp_stride=4",
              "--set", "sel_block=8", "--set", "sel_count=3", "--set", "backend=torch", "--device", "cpu",
              "--eval-windows", "4", "--position-bucket", "16", "--save-every", "0"]


def train_argv(a, extra: list[str], kind: str) -> list[str]:
    """The ``nsa train`` command line of one model of the study."""
    steps = a.steps or (4 if a.smoke else 2400)
    every = a.eval_every or max(1, steps // 12)
    return ["train", "--data", corpus_name(a), "--attention", kind, "--steps", str(steps),
            "--eval-every", str(every), "--out", os.path.join(a.out, kind), "--seed", str(a.seed),
            *(SMOKE_ARGS if a.smoke else GPU_ARGS), *extra]


def corpus_name(a) -> str:
    """The corpus ``--data`` names: ``python`` by default, ``stdlib`` for ``--smoke`` (fast on a CPU)."""
    return a.data or ("stdlib" if a.smoke else "python")


def _saved_step(folder: str) -> int | None:
    p = os.path.join(folder, "checkpoint.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)["step"]


def _check_kept_corpus(folder: str, name: str) -> None:
    """A finished run kept by --resume must be on the corpus asked for (nsa train checks the others)."""
    p, saved = os.path.join(folder, "corpus.json"), None
    if os.path.exists(p):
        with open(p) as f:
            saved = json.load(f).get("name")
    if saved != name:
        raise ValueError(f"--resume: {folder} was trained on --data {saved}, not {name}: pass --data {saved} "
                         f"or another --out")


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def summarize(runs: str, kinds, command: str = "") -> dict:
    """The study's numbers from RUNS/KIND/{log.jsonl,summary.json,corpus.json}: per model the
    validation curve (step, tokens, training seconds, loss), the loss by position at the last
    evaluation, the mean of that loss over the positions inside and beyond the window, tokens/s."""
    from nsa.apps.train import read_log

    models, corpus = {}, None
    for kind in kinds:
        folder = os.path.join(runs, kind)
        with open(os.path.join(folder, "summary.json")) as f:
            s = json.load(f)
        rows = read_log(folder)
        evals = [r for r in rows if "val_loss" in r]
        if not evals:
            raise ValueError(f"{folder}: its log has no evaluation (was --eval-every 0?)")
        last = evals[-1]
        b, pos = last["val_position_bucket"], last["val_position_loss"]
        w = s["config"]["attn"]["window"]
        within = [v for i, v in enumerate(pos) if (i + 1) * b <= w]
        far = [i for i in range(len(pos)) if i * b >= w]  # the buckets beyond the window
        beyond = [pos[i] for i in far]
        keys = ("name", "sha256", "bytes")
        if corpus is None:
            corpus = s["data"]
        elif {k: corpus.get(k) for k in keys} != {k: s["data"].get(k) for k in keys}:
            raise ValueError(f"{folder} was trained on another corpus than {kinds[0]}")
        models[kind] = {
            "params": s["params"], "tokens": s["tokens"], "train_seconds": s["train_seconds"],
            "tokens_per_s": s["tokens_per_s"], "tokens_per_s_steady": s["tokens_per_s_steady"],
            "final_train_loss": s["final_loss"], "val_loss": last["val_loss"], "window": w,
            "val": {k: [r[src] for r in evals] for k, src in (("step", "step"), ("tokens", "tokens"),
                                                               ("train_seconds", "train_seconds"),
                                                               ("loss", "val_loss"))},
            "position_bucket": b, "position_loss": pos,
            "position_loss_within_window": sum(within) / len(within) if within else None,
            "position_loss_beyond_window": sum(beyond) / len(beyond) if beyond else None,
            # per validation window: the mean loss of its buckets beyond w (for paired comparisons)
            "window_loss_beyond_window": [sum(r[i] for i in far) / len(far)
                                          for r in last.get("val_window_position_loss", [])] if far else [],
            "device": s["device"], "torch": s["torch"], "triton": s.get("triton"), "dtype": s["dtype"], "config": s["config"],
            "steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"], "lr": s["lr"],
        }
    first = models[kinds[0]]
    return {"study": "lm_study", "command": command, "device": first["device"], "torch": first["torch"],
            "triton": first["triton"], "python": corpus.get("python"), "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": corpus.get("name"), "corpus": corpus, "models": models,
            "beyond_window_vs_nsa": {k: paired(models[k]["window_loss_beyond_window"],
                                               models["nsa"]["window_loss_beyond_window"])
                                     for k in models if k != "nsa" and "nsa" in models}}


def paired(a: list[float], b: list[float]) -> dict | None:
    """Mean of a - b over paired validation windows, its standard error and the windows: a model's
    loss beyond the window against NSA's on the same bytes (``measurably worse``: mean > 2 se)."""
    if not a or len(a) != len(b) or len(a) < 2:
        return None
    diff = [x - y for x, y in zip(a, b)]
    n = len(diff)
    mean = sum(diff) / n
    sd = (sum((x - mean) ** 2 for x in diff) / (n - 1)) ** 0.5
    return {"mean": mean, "se": sd / n ** 0.5, "windows": n}


def table(res: dict) -> str:
    lines = ["| model | params | tokens | train s | tokens/s | val loss (bits/byte) | loss at positions "
             "< w / >= w | last bucket |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for kind, m in res["models"].items():
        lines.append(f"| {LABELS.get(kind, kind)} | {m['params'] / 1e6:.2f}M | {m['tokens']:,} | "
                     f"{m['train_seconds']:.0f} | {m['tokens_per_s_steady']:,.0f} | {m['val_loss']:.4f} "
                     f"({m['val_loss'] / 0.6931471805599453:.3f}) | {f(m['position_loss_within_window'])} / "
                     f"{f(m['position_loss_beyond_window'])} | {m['position_loss'][-1]:.4f} |")
    for kind, p in res.get("beyond_window_vs_nsa", {}).items():
        if p:
            lines.append(f"\n{LABELS.get(kind, kind)} minus NSA beyond the window, paired over {p['windows']} "
                         f"validation windows: {p['mean']:+.4f} +- {p['se']:.4f} nats/byte (se)")
    return "\n".join(lines)


def title(res: dict) -> str:
    """The plot's title: the corpus (by its record's name) and its size, the device, versions, date."""
    from nsa.apps.data import describe_corpus

    c = res["corpus"]
    return (f"{describe_corpus(c)} ({c['bytes']['train'] / 1e6:.1f} MB train, {c['bytes']['val'] / 1e6:.1f} MB "
            f"validation); {res['device']}, torch {res['torch']}, {res['date'][:10]}, commit {res['commit']}")


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, m in res["models"].items():
        lab = f"{LABELS.get(kind, kind)} ({m['params'] / 1e6:.2f}M, {m['tokens_per_s_steady']:,.0f} tok/s)"
        axes[0].plot([t / 1e6 for t in m["val"]["tokens"]], m["val"]["loss"], marker=".", label=lab)
        axes[1].plot(m["val"]["train_seconds"], m["val"]["loss"], marker=".", label=lab)
        b, pos = m["position_bucket"], m["position_loss"]
        centres = [min(i * b + b / 2, m["seq_len"]) for i in range(len(pos))]
        axes[2].plot(centres, pos, label=LABELS.get(kind, kind))
    w = next(iter(res["models"].values()))["window"]
    axes[2].axvline(w, color="gray", ls="--", lw=1, label=f"window w = {w}")
    axes[0].set(xlabel="training tokens (M)", ylabel="validation loss (nats/byte)")
    axes[1].set(xlabel="training wall-clock (s, evaluations left out)", ylabel="validation loss (nats/byte)")
    axes[2].set(xlabel="token position in the window", ylabel="validation loss at the end (nats/byte)",
                xscale="log")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title(res), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(res: dict, stem: str) -> None:
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, stem + ".png")
    print(table(res))
    print(f"wrote {stem}.json and {stem}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", default="runs/lm_study", help="run folders RUNS/KIND (default runs/lm_study)")
    p.add_argument("--results", default=None,
                   help="results path without extension (default benchmarks/results/lm_study_<gpu>, "
                        "RUNS/lm_study with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each model (default 2400; smoke 4)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps / 12)")
    p.add_argument("--kinds", default=",".join(KINDS), help="attention kinds (default nsa,full,window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("stdlib", "python"), default=None,
                   help="the corpus: python (default), the standard library and the installed packages' "
                        ".py files; stdlib (default with --smoke), the standard library alone")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run of a few seconds")
    p.add_argument("--plot-only", action="store_true", help="only redraw RESULTS from the runs in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --out: finished models are kept, stopped ones resumed, "
                        "missing ones trained")
    a, extra = p.parse_known_args(argv)
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    sys.path.insert(0, os.path.join(HERE, "..", "src"))  # the repo's nsa when not installed
    from nsa.apps import cli

    command = "python benchmarks/lm_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = []
    for kind in a.kinds:
        argv_train = train_argv(a, extra, kind)
        commands.append("nsa " + " ".join(argv_train))
        if a.plot_only:
            continue
        saved = _saved_step(os.path.join(a.out, kind))
        if a.resume and saved is not None:
            if saved >= int(argv_train[argv_train.index("--steps") + 1]):
                _check_kept_corpus(os.path.join(a.out, kind), corpus_name(a))
                print(f"{kind}: finished, kept", flush=True)
                continue
            argv_train.append("--resume")
        print(commands[-1], flush=True)
        rc = cli.main(argv_train)
        if rc:
            return rc
    res = summarize(a.out, a.kinds, command)
    res["train_commands"] = commands
    stem = a.results
    if stem is None:
        if a.smoke or res["device"] == "cpu":
            stem = os.path.join(a.out, "lm_study")
        else:
            from nsa.apps.bench import gpu_tag
            stem = os.path.join(HERE, "results", f"lm_study_{gpu_tag(res['device'])}")
    write(res, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
