"""``nsa train``: train the small model, NSA next to its baselines, on the embedded passkey task,
the Python standard library's sources (``--data stdlib``), those and the installed packages'
(``--data python``) or any text file, then measure needle retrieval (:mod:`nsa.apps.needle`) or
validation loss.

``nsa train`` with no arguments is the project's main command: it trains the tiny preset
with NSA attention and with window-only attention on the embedded passkey task, then
evaluates both on a grid of context lengths x needle depths and writes the heatmap.
Checkpoints (atomic, exact resume) are :mod:`nsa.apps.checkpoint`'s.

Each run folder gets ``log.jsonl``: one line per step with ``step``, ``loss``, ``lr``, ``tokens``
(seen so far, the whole global batch, across resumes), ``train_seconds`` (wall clock of the
training steps so far, across resumes, evaluations left out) and ``seconds`` (wall clock since
this process started training, evaluations included). On text data (``--data``) the lines of
evaluation steps (every ``--eval-every`` steps and the last) add ``val_loss`` (mean cross-entropy
in nats per byte over ``--eval-windows`` fixed validation windows, the same for every model),
``val_position_loss`` (the same mean per bucket of ``val_position_bucket`` token positions of
the window: position t predicts byte t + 1 from t + 1 bytes of context) and ``eval_seconds``;
the last evaluation's line also ``val_window_position_loss`` (those means per window). At the
end ``summary.json`` holds the totals, training tokens/s and, for text data,
``corpus.json``'s record of the data (for the Python corpora: Python version, roots, files, bytes
and hashes).

Distributed: ``torchrun --nproc_per_node N -m nsa train ...`` runs data parallel (DDP, or
FSDP2 with ``--fsdp``); each process takes its slice of the same global batch, so the loss
equals a one-process run's up to fp32 reduction order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist

from ..model import ATTENTIONS, ModelConfig, NSAModel, PRESETS
from .checkpoint import init_path, init_weights, load_checkpoint, resume_checkpoint, save_checkpoint
from .data import CORPORA, ByteText, PasskeyTask, TextCorpus, describe_corpus
from .needle import add_grid_arguments, needle_accuracy, needle_grid, report
from .runtime import (COMPILE_MODES, Dist, all_sum, comma_list, compile_model, compiled_step_begin, fraction,
                      init_distributed, nonnegative_float, nonnegative_int, out_folder, positive_float, positive_int,
                      resolve_device, wrap_model)

HELP = {"train": "train the small NSA language model (and its baselines), then the needle grid"}

# defaults of the main command, per preset: (seq_len, batch_size, steps, lr)
TRAIN_DEFAULTS = {"tiny": (384, 16, 500, 4e-3), "small": (2048, 8, 1000, 2e-3), "base": (8192, 16, 4000, 6e-4)}


def _attention_kind(s: str) -> str:
    if s not in ATTENTIONS:
        raise argparse.ArgumentTypeError(f"unknown attention kind {s!r}; choose from {', '.join(ATTENTIONS)}")
    return s


# --------------------------------------------------------------------------- arguments
def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name != "train":
        raise ValueError(f"nsa.apps.train has no command {name!r}")
    def defaults(i):
        return ", ".join(f"{k} {v[i]:g}" for k, v in TRAIN_DEFAULTS.items())

    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default tiny)")
    p.add_argument("--attention", type=comma_list(_attention_kind), default=["nsa", "window"],
                   help="comma-separated attention kinds to train one after the other: "
                        "nsa, full, window (default nsa,window)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="train byte-level on this text file instead of the embedded passkey task; "
                        "'stdlib': on the .py files of the running Python's standard library, split "
                        "by file; 'python': on those and the .py files of its installed packages "
                        "(site-packages), a larger corpus that depends on what is installed "
                        "(docs/lm_study.md; a file named stdlib or python: ./stdlib, ./python)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per sequence (preset default: {defaults(0)})")
    p.add_argument("--min-seq-len", type=positive_int, default=None,
                   help="passkey task: draw each batch's length from [min, seq-len] "
                        "(default seq-len / 3; equal to --seq-len for one length)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch in sequences (preset default: {defaults(1)})")
    p.add_argument("--steps", type=positive_int, default=None, help=f"optimizer steps (preset default: {defaults(2)})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (preset default: {defaults(3)})")
    p.add_argument("--warmup", type=nonnegative_int, default=30, help="linear warm-up steps (default 30)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--answer-weight", type=nonnegative_float, default=5.0,
                   help="loss weight of the pass key's digits in the answer (default 5)")
    p.add_argument("--digits", type=positive_int, default=None, help="pass key length (task default 5)")
    p.add_argument("--near-needles", type=fraction, default=0.0, metavar="FRACTION",
                   help="passkey task: fraction of sequences whose needle is within 512 bytes "
                        "of the question (default 0: uniform depths)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (repeatable), e.g. --set n_layers=4; the attention "
                        "layer's NSAConfig fields flat or dotted: --set window=64 or --set attn.window=64")
    p.add_argument("--eval-every", type=nonnegative_int, default=100,
                   help="steps between evaluations (0: never; default 100)")
    p.add_argument("--until-needle", type=fraction, default=None, metavar="ACC",
                   help="passkey task: stop once the periodic needle check (every --eval-every steps, at "
                        "--seq-len, 24 needles) retrieves at least this fraction; that step's checkpoint "
                        "is the run's last (--steps is then the most it trains; a curriculum's first "
                        "stage runs until the lookup is learned)")
    p.add_argument("--eval-windows", type=positive_int, default=32,
                   help="text data: validation windows of --seq-len tokens at fixed offsets of the "
                        "validation split (default 32)")
    p.add_argument("--position-bucket", type=nonnegative_int, default=0,
                   help="text data: token positions per bucket of the validation loss by position "
                        "(default 0: seq-len / 64)")
    p.add_argument("--save-every", type=nonnegative_int, default=100,
                   help="steps between checkpoints (0: end only; default 100)")
    p.add_argument("--out", default="runs/tiny", help="output folder (default runs/tiny)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the model (inductor): fewer, fused kernels a step where a small "
                        "model's step waits on Python's launches; the first steps compile (a new sequence "
                        "length recompiles once, then the shapes are dynamic). MODE: torch.compile's mode "
                        f"({', '.join(COMPILE_MODES)}; default: default; reduce-overhead replays each step's "
                        "kernels as CUDA graphs)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from these weights (a checkpoint folder, its KIND subfolder per "
                        "attention kind when present, or a .safetensors file) with a fresh "
                        "optimizer and schedule (warm-up to --lr again: pass a lower --lr "
                        "to keep what was learnt): e.g. continue a short-context run at longer "
                        "lengths")
    p.add_argument("--seed", type=int, default=0, help="model init and data (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="autocast dtype for the forward pass (bfloat16 on CUDA only)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP when distributed")
    p.add_argument("--no-needle", action="store_true", help="skip the needle grid after training")
    add_grid_arguments(p)


def run(name: str, args) -> int:
    if name != "train":
        raise ValueError(f"nsa.apps.train has no command {name!r}")
    return cmd_train(args)


# --------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def parse_overrides(items: list[str]) -> dict:
    """``["window=64", "attn.compress=mean"]`` -> typed ModelConfig fields, for
    :meth:`ModelConfig.replace` (which takes the attention layer's fields flat or dotted)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            _, f = ModelConfig.find_field(k)
        except ValueError as e:
            raise ValueError(f"--set: {e}") from None
        t = str(f.type)
        if t == "NSAConfig":
            raise ValueError(f"--set {k}: name one of its fields, e.g. --set attn.window=64")
        if "None" in t and v.lower() == "none":
            out[k] = None
        elif "bool" in t:
            if v.lower() not in ("1", "0", "true", "false"):
                raise ValueError(f"--set {k} expects true or false, got {v!r}")
            out[k] = v.lower() in ("1", "true")
        elif "int" in t or "float" in t:
            try:
                out[k] = int(v) if "int" in t else float(v)
            except ValueError:
                raise ValueError(f"--set {k} expects a number, got {v!r}") from None
        else:
            out[k] = v
    return out


def make_task(args, seq_len: int):
    if args.data in CORPORA:
        return CORPORA[args.data](seq_len, seed=args.seed)
    if args.data:
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data!r} is not a file")
        return ByteText(args.data, seq_len, seed=args.seed)
    kw = {} if args.digits is None else {"digits": args.digits}
    kw["near"] = args.near_needles
    task = PasskeyTask(seq_len, seed=args.seed, answer_weight=args.answer_weight, **kw)
    lo = args.min_seq_len if args.min_seq_len is not None else max(task.min_len, seq_len // 3)
    return PasskeyTask(seq_len, seed=args.seed, answer_weight=args.answer_weight, min_len=lo, **kw)


def cmd_train(args) -> int:
    kinds = list(dict.fromkeys(args.attention))  # in order, each once
    # the preset's defaults for what was not given (argparse has rejected values <= 0)
    for name, default in zip(("seq_len", "batch_size", "steps", "lr"), TRAIN_DEFAULTS[args.preset]):
        if getattr(args, name) is None:
            setattr(args, name, default)
    overrides = parse_overrides(args.set)
    configs = {kind: ModelConfig.preset(args.preset, attention=kind,
                                        max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len),
                                        **overrides) for kind in kinds}
    folders = {kind: os.path.join(args.out, kind) if len(kinds) > 1 else args.out for kind in kinds}
    # the user's errors before any training (and on every process, before they wait for each other)
    if args.init and args.resume:
        raise ValueError("--init and --resume exclude each other (--resume restores its own weights)")
    out_folder(args.out)
    for out in folders.values():
        out_folder(out)
        if not args.resume and os.path.exists(os.path.join(out, "checkpoint.json")):
            raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it, or "
                             f"another --out")
    d = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.until_needle is not None and (args.data or not args.eval_every):
        raise ValueError("--until-needle needs the passkey task (no --data) and --eval-every > 0")
    if args.data and d.world > 1 and args.eval_every and args.eval_windows % d.world:
        raise ValueError(f"--eval-windows ({args.eval_windows}) must be a multiple of the number of "
                         f"processes ({d.world})")
    device = resolve_device(args.device, d)
    for kind, config in configs.items():
        train(config, args, folders[kind], device, d)
    if d.world > 1:
        dist.barrier()  # the checkpoints are written before rank 0 reads them
    if d.main and not args.data and not args.no_needle:
        models = {k: load_checkpoint(f, device) for k, f in folders.items()}
        grid = needle_grid(models, args, device)
        report(grid, os.path.join(args.out, "needle"))
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def train(config: ModelConfig, args, out: str, device: str, d: Dist) -> NSAModel:
    """Train one model; checkpoints go to ``out`` (see :func:`save_checkpoint`)."""
    torch.manual_seed(args.seed)
    model = NSAModel(config).to(device)
    if args.init:  # before sharding: FSDP2 turns the parameters into shards
        init_weights(model, init_path(args.init, config.attention))
    task = make_task(args, args.seq_len)
    text = isinstance(task, TextCorpus)
    if text:
        _check_corpus(out, task.info, args.resume)
    # the optimizer is made after sharding (FSDP2 replaces the parameters by sharded ones)
    wrapped = wrap_model(model, args.fsdp, d, device)
    if args.compile:
        wrapped = compile_model(wrapped, args.compile)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    start = 0
    if args.resume:
        start = resume_checkpoint(out, model, opt, args, d)
        if d.main:
            print(f"resumed {out} at step {start}")
    log_path = os.path.join(out, "log.jsonl")
    # what the steps before ``start`` saw and took: tokens from the data, seconds from the log
    tokens = sum(args.batch_size * task.length(s) for s in range(start))
    train_s = 0.0
    if d.main:
        _truncate_log(log_path, start)
        train_s = _logged_seconds(log_path, start)
        if text:
            with open(os.path.join(out, "corpus.json"), "w") as f:
                json.dump(task.info, f, indent=1)
        lo = getattr(task, "min_seq_len", args.seq_len)
        print(f"training {config.attention} ({model.num_params() / 1e6:.2f}M parameters, "
              f"{d.world} process{'es' if d.world > 1 else ''}, {device}) for {args.steps} steps "
              f"of {args.batch_size} x {f'{lo}..' if lo != args.seq_len else ''}{args.seq_len} tokens -> {out}")
        if text and task.info["name"] in CORPORA:
            i = task.info
            per_source = "".join(f", {k} {v / 1e6:.1f} MB" for k, v in i.get("source_bytes", {}).items())
            print(f"corpus: {describe_corpus(i)}, {i['files']['train']} + {i['files']['val']} "
                  f"files, {i['bytes']['train']:,} + {i['bytes']['val']:,} bytes (train + validation"
                  f"{per_source}), file list sha256 {i['file_list_sha256'][:12]}")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    if args.dtype == "bfloat16" and not device.startswith("cuda"):
        raise ValueError("--dtype bfloat16 needs --device cuda")
    bar = _progress(start, args.steps, d.main, config.attention)
    t_last, s_last, tok_last = time.perf_counter(), train_s, tokens  # progress bar's tokens/s
    t_start = time.perf_counter()
    global_loss, val = None, None
    model.train()
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y, w = task.batch(step, args.batch_size, d.rank, d.world, device)
        tokens += args.batch_size * x.shape[1]
        compiled_step_begin(args.compile)
        with autocast:
            logits = wrapped(x)
        loss_sum, w_sum = weighted_ce(logits, y, w)
        # normalise by the global weight so the summed gradient equals one process's
        w_total = all_sum(w_sum.detach(), d)
        loss = loss_sum * d.world / w_total  # DDP/FSDP average over processes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        global_loss = float(all_sum(loss_sum.detach(), d) / w_total)  # waits for the step
        train_s += time.perf_counter() - t0
        done = step + 1
        # evaluate every eval_every steps; text data also after the last step
        at_eval = bool(args.eval_every) and (done % args.eval_every == 0 if done < args.steps else text)
        rec = {"step": done, "loss": global_loss, "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t_start, 3), "tokens": tokens,
               "train_seconds": round(train_s, 3)}
        if at_eval and text:
            val = evaluate_text(model, task, args.eval_windows, args.position_bucket, args.eval_batch,
                                device, d, autocast)
            rec.update(val_loss=val["loss"], val_position_loss=val["position_loss"],
                       val_position_bucket=val["position_bucket"], eval_seconds=round(val["seconds"], 3))
            if done == args.steps:  # the last evaluation also per window (paired comparisons)
                rec["val_window_position_loss"] = val["window_position_loss"]
        stop = False
        if at_eval and not text:
            rec["needle_accuracy"] = _periodic_eval(model, task, args, device, d, bar, done)
            stop = args.until_needle is not None and rec["needle_accuracy"] >= args.until_needle
        if d.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            dt = time.perf_counter() - t_last
            post = dict(loss=f"{global_loss:.4f}", tok_s=f"{(tokens - tok_last) / max(train_s - s_last, 1e-9):,.0f}")
            if val is not None:
                post["val"] = f"{val['loss']:.4f}"
            bar.set_postfix(**post)
            bar.update(1)
            if dt > 10:
                t_last, s_last, tok_last = time.perf_counter(), train_s, tokens
            if at_eval and text:
                bar.write(f"step {done}: val loss {val['loss']:.4f} ({val['loss'] / math.log(2):.3f} bits/byte)")
        if done == args.steps or stop or (args.save_every and done % args.save_every == 0):
            save_checkpoint(out, model, opt, done, args, d, global_loss)
        if stop:
            if d.main:
                bar.write(f"step {done}: needle accuracy {rec['needle_accuracy']:.3f} >= {args.until_needle}: stopped")
            break
    if d.main:
        bar.close()
        summary = _summary(config, model, args, out, device, d, tokens, train_s, global_loss, val,
                           task.info if text else {"name": "passkey"})
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if text:
            v = f", val loss {val['loss']:.4f}" if val else ""
            print(f"{config.attention}: {tokens:,} tokens in {train_s:.1f} s of training steps "
                  f"({summary['tokens_per_s']:,.0f} tokens/s; {summary['tokens_per_s_steady']:,.0f} after the "
                  f"first tenth){v}")
    return model


@torch.no_grad()
def evaluate_text(model, task: TextCorpus, windows: int, bucket: int, batch: int, device, d: Dist,
                  autocast=None) -> dict:
    """Validation loss of ``model`` on ``task``'s ``windows`` fixed validation windows
    (:meth:`TextCorpus.val_windows`; process r of N takes windows r, r + N, ...).

    Returns {"loss": mean cross-entropy (nats per byte) over every position of every window,
    "position_loss": the mean over windows and over the positions [i * b, (i + 1) * b) of each
    bucket i, b = ``bucket`` (0: seq_len // 64, at least 1; the last bucket may be shorter),
    "window_position_loss": the same per window ([windows][buckets]: paired comparisons of two
    models on the same bytes), "position_bucket": b, "windows", "seconds"}. The model is put
    back in training mode."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    x, y = task.val_windows(windows)  # [n, T]
    T = x.shape[1]
    b = bucket or max(1, T // 64)
    mine = list(range(d.rank, windows, d.world))
    ce_win = torch.zeros(windows, T, dtype=torch.float64, device=device)  # this process's rows filled
    for i in range(0, len(mine), batch):
        rows = mine[i:i + batch]
        xb, yb = x[rows].to(device), y[rows].to(device)
        with autocast or contextlib.nullcontext():
            logits = model(xb)
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none")
        ce_win[rows] = ce.view(len(rows), T).double()
    ce_win = all_sum(ce_win, d)  # [windows, T]
    ce_pos = ce_win.sum(0) / windows  # [T] mean over windows
    buckets = [float(ce_pos[s:s + b].mean()) for s in range(0, T, b)]
    per_window = torch.stack([ce_win[:, s:s + b].mean(1) for s in range(0, T, b)], 1).tolist()
    model.train(was_training)
    return {"loss": float(ce_pos.mean()), "position_loss": buckets, "window_position_loss": per_window,
            "position_bucket": b, "windows": windows, "seconds": time.perf_counter() - t0}


def _check_corpus(out: str, info: dict, resume: bool) -> None:
    """--resume must continue on the data the run started on: the same corpus name, bytes and
    hashes (a Python corpus differs between Python versions and, for ``python``, between sets of
    installed packages)."""
    path = os.path.join(out, "corpus.json")
    if not (resume and os.path.exists(path)):
        return
    with open(path) as f:
        saved = json.load(f)
    keys = ("name", "bytes", "sha256", "file_list_sha256")
    if any(saved.get(k) != info.get(k) for k in keys):
        raise ValueError(f"--resume: the data differs from the saved run's ({path}: {saved.get('name')!r}, "
                         f"Python {saved.get('python', '?')}, {saved.get('bytes')} bytes; now "
                         f"{info.get('name')!r}, Python {info.get('python', '?')}, {info.get('bytes')} bytes)")


def _logged_seconds(path: str, step: int) -> float:
    """``train_seconds`` of the log's line of ``step`` (0 when there is none)."""
    if step == 0 or not os.path.exists(path):
        return 0.0
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return float(next((r.get("train_seconds", 0.0) for r in rows if r["step"] == step), 0.0))


def _summary(config, model, args, out, device, d, tokens, train_s, loss, val, data) -> dict:
    """What ``summary.json`` holds: the run's totals and its training throughput."""
    import platform

    rows = [r for r in read_log(out) if "train_seconds" in r]
    k = len(rows) // 10  # the first steps autotune and compile: leave the first tenth out
    steady = ((rows[-1]["tokens"] - rows[k]["tokens"]) / (rows[-1]["train_seconds"] - rows[k]["train_seconds"])
              if len(rows) > 1 and k < len(rows) - 1 and rows[-1]["train_seconds"] > rows[k]["train_seconds"]
              else (tokens / train_s if train_s else 0.0))
    evals = [r for r in rows if "val_loss" in r]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"attention": config.attention, "preset": args.preset, "params": model.num_params(),
            "config": config.to_dict(), "steps": args.steps, "steps_done": rows[-1]["step"] if rows else 0,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "tokens": tokens,
            "train_seconds": round(train_s, 3), "tokens_per_s": tokens / train_s if train_s else 0.0,
            "tokens_per_s_steady": steady, "final_loss": loss,
            "val_loss": val["loss"] if val else (evals[-1]["val_loss"] if evals else None),
            "data": data, "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "dtype": args.dtype, "processes": d.world, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _truncate_log(path: str, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (a resumed run rewrites the ones after)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def read_log(out: str) -> list[dict]:
    """The per-step log of a run: [{"step", "loss", "lr", "tokens", "train_seconds", ...}, ...]
    (the module docstring lists the fields)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def weighted_ce(logits, targets, weights):
    """(sum of weight * cross-entropy, sum of weights) over the positions of this batch."""
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    w = weights.flatten().float()
    return (ce * w).sum(), w.sum()


def _progress(start, total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc=desc, unit="step",
                dynamic_ncols=True, mininterval=1.0)


@torch.no_grad()
def _periodic_eval(model, task, args, device, d, bar, step):
    """The passkey task's periodic check: needle accuracy at the training length (returned: the
    mean over its depths)."""
    model.eval()
    # accuracy on fresh needles at the training length, all past the window
    far = [0.0, 0.25, 0.5]
    # every process runs it: FSDP2's forward needs all of them
    acc = needle_accuracy(model, task, task.seq_len, far, samples=8, seed=10_000 + step,
                          device=device, batch=args.eval_batch)
    msg = f"step {step}: needle accuracy at {task.seq_len} tokens, depths {far}: " \
          f"{[round(a, 2) for a in acc]}"
    if d.main:
        bar.write(msg)
    model.train()
    return sum(acc) / len(acc)
