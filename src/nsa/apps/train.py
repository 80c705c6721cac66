"""``nsa train``: train the small model, NSA next to its baselines, on the embedded passkey task
(or any text file), then measure needle retrieval (:mod:`nsa.apps.needle`).

``nsa train`` with no arguments is the project's main command: it trains the tiny preset
with NSA attention and with window-only attention on the embedded passkey task, then
evaluates both on a grid of context lengths x needle depths and writes the heatmap.
Checkpoints (atomic, exact resume) are :mod:`nsa.apps.checkpoint`'s.

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
from .data import ByteText, PasskeyTask
from .needle import add_grid_arguments, needle_accuracy, needle_grid, report
from .runtime import (Dist, all_sum, comma_list, fraction, init_distributed, nonnegative_float, nonnegative_int,
                      out_folder, positive_float, positive_int, resolve_device, wrap_model)

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
                   help="train byte-level on this text file instead of the embedded passkey task")
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
    p.add_argument("--save-every", type=nonnegative_int, default=100,
                   help="steps between checkpoints (0: end only; default 100)")
    p.add_argument("--out", default="runs/tiny", help="output folder (default runs/tiny)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
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
    # the optimizer is made after sharding (FSDP2 replaces the parameters by sharded ones)
    wrapped = wrap_model(model, args.fsdp, d, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    start = 0
    if args.resume:
        start = resume_checkpoint(out, model, opt, args, d)
        if d.main:
            print(f"resumed {out} at step {start}")
    if d.main:
        _truncate_log(os.path.join(out, "log.jsonl"), start)
        lo = getattr(task, "min_seq_len", args.seq_len)
        print(f"training {config.attention} ({model.num_params() / 1e6:.2f}M parameters, "
              f"{d.world} process{'es' if d.world > 1 else ''}, {device}) for {args.steps} steps "
              f"of {args.batch_size} x {f'{lo}..' if lo != args.seq_len else ''}{args.seq_len} tokens -> {out}")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    if args.dtype == "bfloat16" and not device.startswith("cuda"):
        raise ValueError("--dtype bfloat16 needs --device cuda")
    bar = _progress(start, args.steps, d.main, config.attention)
    t_last, n_last, tok_last, tokens = time.perf_counter(), 0, 0, 0
    t_start = time.perf_counter()
    model.train()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y, w = task.batch(step, args.batch_size, d.rank, d.world, device)
        tokens += args.batch_size * x.shape[1]
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
        global_loss = float(all_sum(loss_sum.detach(), d) / w_total)
        n_last += 1
        if d.main:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": global_loss, "lr": opt.param_groups[0]["lr"],
                                    "seconds": round(time.perf_counter() - t_start, 3),
                                    "tokens": tokens}) + "\n")
            dt = time.perf_counter() - t_last
            bar.set_postfix(loss=f"{global_loss:.4f}", tok_s=f"{(tokens - tok_last) / dt:,.0f}")
            bar.update(1)
            if dt > 10:
                t_last, n_last, tok_last = time.perf_counter(), 0, tokens
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            _periodic_eval(model, task, args, device, d, bar, done)
        if done == args.steps or (args.save_every and done % args.save_every == 0):
            save_checkpoint(out, model, opt, done, args, d, global_loss)
    if d.main:
        bar.close()
    return model


def _truncate_log(path: str, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (a resumed run rewrites the ones after)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def read_log(out: str) -> list[dict]:
    """The per-step log of a run: [{"step", "loss", "lr"}, ...]."""
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
    model.eval()
    if isinstance(task, PasskeyTask):
        # accuracy on fresh needles at the training length, all past the window
        far = [0.0, 0.25, 0.5]
        # every process runs it: FSDP2's forward needs all of them
        acc = needle_accuracy(model, task, task.seq_len, far, samples=8, seed=10_000 + step,
                              device=device, batch=args.eval_batch)
        msg = f"step {step}: needle accuracy at {task.seq_len} tokens, depths {far}: " \
              f"{[round(a, 2) for a in acc]}"
    else:
        x, y, w = task.batch(step, args.batch_size, d.rank, d.world, device, split="val")
        ls, ws = weighted_ce(model(x), y, w)
        val = float(all_sum(ls, d) / all_sum(ws, d))
        msg = f"step {step}: val loss {val:.4f} ({val / math.log(2):.3f} bits/byte)"
    if d.main:
        bar.write(msg)
    model.train()
