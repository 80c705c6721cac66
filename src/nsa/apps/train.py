"""``nsa train``, ``nsa generate`` and ``nsa needle``: train the small model, sample from it,
and measure needle retrieval for NSA next to its baselines.

``nsa train`` with no arguments is the project's main command: it trains the tiny preset
with NSA attention and with window-only attention on the embedded passkey task, then
evaluates both on a grid of context lengths x needle depths and writes the heatmap.

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
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .data import ByteText, PasskeyTask, decode, encode
from ..model import ATTENTIONS, ModelConfig, NSAModel, PRESETS, load_model, load_weights

# defaults of the main command, per preset: (seq_len, batch_size, steps, lr)
TRAIN_DEFAULTS = {"tiny": (384, 16, 500, 4e-3), "small": (2048, 8, 1000, 2e-3), "base": (8192, 16, 4000, 6e-4)}


# --------------------------------------------------------------------------- arguments
def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "train":
        p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default tiny)")
        p.add_argument("--attention", default="nsa,window",
                       help="comma-separated attention kinds to train one after the other: "
                            "nsa, full, window (default nsa,window)")
        p.add_argument("--data", default=None, metavar="PATH",
                       help="train byte-level on this text file instead of the embedded passkey task")
        p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (preset default)")
        p.add_argument("--min-seq-len", type=int, default=None,
                       help="passkey task: draw each batch's length from [min, seq-len] "
                            "(default seq-len / 3; equal to --seq-len for one length)")
        p.add_argument("--batch-size", type=int, default=None, help="global batch in sequences")
        p.add_argument("--steps", type=int, default=None, help="optimizer steps")
        p.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (preset default: " + ", ".join(
                           f"{k} {v[3]:g}" for k, v in TRAIN_DEFAULTS.items()) + ")")
        p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps (default 30)")
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--answer-weight", type=float, default=5.0,
                       help="loss weight of the pass key's digits in the answer (default 5)")
        p.add_argument("--digits", type=int, default=None, help="pass key length (task default)")
        p.add_argument("--near-needles", type=float, default=0.0, metavar="FRACTION",
                       help="passkey task: fraction of sequences whose needle is within 512 bytes "
                            "of the question (default 0: uniform depths)")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a ModelConfig field, e.g. --set window=64 (repeatable)")
        p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (0: never)")
        p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (0: end only)")
        p.add_argument("--out", default="runs/tiny", help="output folder (default runs/tiny)")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
        p.add_argument("--init", default=None, metavar="CKPT",
                       help="start from these weights (a checkpoint folder, its KIND subfolder per "
                            "attention kind when present, or a .safetensors file) with a fresh "
                            "optimizer and schedule (warm-up to --lr again: pass a lower --lr "
                            "to keep what was learnt): e.g. continue a short-context run at longer "
                            "lengths")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                       help="autocast dtype for the forward pass (bfloat16 on CUDA only)")
        p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP when distributed")
        p.add_argument("--no-needle", action="store_true", help="skip the needle grid after training")
        _needle_grid_args(p)
    elif name == "generate":
        p.add_argument("checkpoint", help="checkpoint folder (or a .safetensors file)")
        p.add_argument("--prompt", default=None, help="text to continue (default: a passkey question)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
        p.add_argument("--cuda-graph", action="store_true",
                       help="replay the decode step as a CUDA graph (CUDA; NSA on the Triton "
                            "backend, or a baseline)")
        p.add_argument("--device", default=None)
    elif name == "needle":
        p.add_argument("checkpoints", nargs="+", help="checkpoint folders or .safetensors files, "
                                                      "one heatmap panel each")
        p.add_argument("--out", default="runs/needle", help="writes OUT.png and OUT.json")
        p.add_argument("--device", default=None)
        _needle_grid_args(p)
    else:
        raise ValueError(f"nsa.apps.train has no command {name!r}")


def _needle_grid_args(p):
    p.add_argument("--contexts", default=None, help="comma-separated context lengths (default: "
                                                    "from a third to twice the training length)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=16, help="needles per grid cell (default 16)")
    p.add_argument("--eval-batch", type=int, default=16, help="sequences per forward pass")


def run(name: str, args) -> int:
    if name == "train":
        return cmd_train(args)
    if name == "generate":
        return cmd_generate(args)
    if name == "needle":
        return cmd_needle(args)
    raise ValueError(f"nsa.apps.train has no command {name!r}")


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes (WORLD_SIZE > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(arg: str | None, d: Dist) -> str:
    if arg is None:
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        if d.world > 1:
            arg = f"cuda:{d.local_rank}"
            torch.cuda.set_device(arg)
    elif arg != "cpu":
        raise ValueError(f"--device must be cpu or cuda, got {arg!r}")
    return arg


# --------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def parse_overrides(items: list[str]) -> dict:
    """``["window=64", "compress=mean"]`` -> typed ModelConfig fields."""
    from dataclasses import fields

    types = {f.name: f.type for f in fields(ModelConfig)}
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k not in types:
            raise ValueError(f"--set: ModelConfig has no field {k!r}; fields: {sorted(types)}")
        t = str(types[k])
        if "bool" in t:
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
    kw["near"] = getattr(args, "near_needles", 0.0)
    if not 0.0 <= kw["near"] <= 1.0:
        raise ValueError(f"--near-needles must be a fraction in [0, 1], got {kw['near']}")
    task = PasskeyTask(seq_len, seed=args.seed, answer_weight=args.answer_weight, **kw)
    lo = args.min_seq_len if args.min_seq_len is not None else max(task.min_len, seq_len // 3)
    return PasskeyTask(seq_len, seed=args.seed, answer_weight=args.answer_weight, min_len=lo, **kw)


def cmd_train(args) -> int:
    kinds = [k.strip() for k in args.attention.split(",") if k.strip()]
    for k in kinds:
        if k not in ATTENTIONS:
            raise ValueError(f"--attention: unknown kind {k!r}; choose from {ATTENTIONS}")
    seq_len, batch, steps, lr = TRAIN_DEFAULTS[args.preset]
    args.seq_len = args.seq_len or seq_len
    args.batch_size = args.batch_size or batch
    args.steps = args.steps if args.steps is not None else steps
    args.lr = args.lr or lr
    for name in ("seq_len", "batch_size", "steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    d = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = _device(args.device, d)
    overrides = parse_overrides(args.set)
    folders = {}
    for kind in kinds:
        config = ModelConfig.preset(args.preset, attention=kind,
                                    max_seq_len=max(args.seq_len, PRESETS[args.preset].max_seq_len),
                                    **overrides)
        out = os.path.join(args.out, kind) if len(kinds) > 1 else args.out
        train(config, args, out, device, d)
        folders[kind] = out
    if d.world > 1:
        dist.barrier()  # the checkpoints are written before rank 0 reads them
    if d.main and not args.data and not args.no_needle:
        models = {k: load_checkpoint(f, device) for k, f in folders.items()}
        grid = needle_grid(models, args, device)
        _report(grid, os.path.join(args.out, "needle"))
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _wrap(model: NSAModel, args, d: Dist, device: str):
    """DDP (default) or FSDP2 around the model when distributed; the model itself otherwise."""
    if d.world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device] if device.startswith("cuda") else None)


def train(config: ModelConfig, args, out: str, device: str, d: Dist) -> NSAModel:
    """Train one model; checkpoints go to ``out`` (see :func:`save_checkpoint`)."""
    torch.manual_seed(args.seed)
    model = NSAModel(config).to(device)
    if args.init and args.resume:
        raise ValueError("--init and --resume exclude each other (--resume restores its own weights)")
    if args.init:  # before sharding: FSDP2 turns the parameters into shards
        init_weights(model, _init_path(args.init, config.attention))
    task = make_task(args, args.seq_len)
    # the optimizer is made after sharding (FSDP2 replaces the parameters by sharded ones)
    wrapped = _wrap(model, args, d, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    start = 0
    if args.resume:
        start = resume_checkpoint(out, model, opt, args, d)
        if d.main:
            print(f"resumed {out} at step {start}")
    elif d.main and os.path.exists(os.path.join(out, "checkpoint.json")):
        raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it, or "
                         f"another --out")
    if d.main:
        os.makedirs(out, exist_ok=True)
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
        w_total = _all_sum(w_sum.detach(), d)
        loss = loss_sum * d.world / w_total  # DDP/FSDP average over processes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        global_loss = float(_all_sum(loss_sum.detach(), d) / w_total)
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


def _all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


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
        val = float(_all_sum(ls, d) / _all_sum(ws, d))
        msg = f"step {step}: val loss {val:.4f} ({val / math.log(2):.3f} bits/byte)"
    if d.main:
        bar.write(msg)
    model.train()


# --------------------------------------------------------------------------- checkpoints
def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _full_state(model, opt, d: Dist):
    """Model and optimizer state dicts, whole (gathered from FSDP2 shards when sharded)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
    return model.state_dict(), opt.state_dict()


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def save_checkpoint(out, model, opt, step, args, d: Dist, loss: float) -> None:
    """Write ``model-STEP.safetensors`` (weights) and ``state-STEP.pt`` (optimizer, RNG, step),
    then point ``checkpoint.json`` at them (an atomic rename): a crash at any moment leaves
    the previous checkpoint whole."""
    sd, osd = _full_state(model, opt, d)
    if not d.main:
        return
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    meta = {"config": json.dumps(model.config.to_dict()), "step": str(step)}
    mname, sname = f"model-{step:07d}.safetensors", f"state-{step:07d}.pt"
    _atomic_write(os.path.join(out, mname), lambda p: save_file(tensors, p, metadata=meta))
    state = {"optimizer": osd, "step": step, "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "args": {k: v for k, v in vars(args).items() if k != "func"}}
    _atomic_write(os.path.join(out, sname), lambda p: torch.save(state, p))
    info = {"step": step, "model": mname, "state": sname, "loss": loss,
            "config": model.config.to_dict(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    old = _read_pointer(out)
    _atomic_write(os.path.join(out, "checkpoint.json"),
                  lambda p: open(p, "w").write(json.dumps(info, indent=1)))
    if old and old["step"] != step:  # the previous checkpoint is no longer pointed at
        for key in ("model", "state"):
            try:
                os.remove(os.path.join(out, old[key]))
            except FileNotFoundError:
                pass


def _read_pointer(out: str) -> dict | None:
    p = os.path.join(out, "checkpoint.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


# options added after runs were saved: such a run ran with the default
_ADDED_LATER = {"near_needles": 0.0}


def resume_checkpoint(out, model, opt, args, d: Dist) -> int:
    info = _read_pointer(out)
    if info is None:
        raise ValueError(f"--resume: no checkpoint.json in {out!r}")
    from safetensors.torch import load_file

    saved = torch.load(os.path.join(out, info["state"]), map_location="cpu", weights_only=False)
    for key in ("seq_len", "min_seq_len", "batch_size", "seed", "lr", "steps", "warmup", "data",
                "answer_weight", "digits", "near_needles"):
        old = saved["args"].get(key, _ADDED_LATER.get(key))
        new = getattr(args, key, None)
        if key != "steps" and old != new:
            raise ValueError(f"--resume: --{key.replace('_', '-')} was {old!r} in the saved run, "
                             f"now {new!r}; resuming would not continue the same run")
    if args.steps != saved["args"]["steps"]:
        raise ValueError(f"--resume: --steps was {saved['args']['steps']} (the schedule depends "
                         f"on it), now {args.steps}")
    tensors = load_file(os.path.join(out, info["model"]))
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if model.config.tie_embeddings:
            tensors["lm_head.weight"] = tensors["embed.weight"]
        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, tensors, options=o)
        set_optimizer_state_dict(model, opt, saved["optimizer"], options=o)
    else:
        dev = next(model.parameters()).device
        load_weights(model, {k: v.to(dev) for k, v in tensors.items()})
        opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return int(info["step"])


def _init_path(path: str, kind: str) -> str:
    """--init's checkpoint for one attention kind: PATH/KIND when PATH holds one per kind."""
    sub = os.path.join(path, kind)
    return sub if os.path.isdir(sub) else path


def init_weights(model: NSAModel, path: str) -> None:
    """Copy a checkpoint's weights into ``model``, whose architecture must be the same (every
    config field but max_seq_len and backend, which change no weight)."""
    saved = load_checkpoint(path)
    free = {"max_seq_len", "backend"}
    diff = {k: (v, getattr(model.config, k)) for k, v in saved.config.to_dict().items()
            if k not in free and getattr(model.config, k) != v}
    if diff:
        raise ValueError(f"--init {path!r}: its config differs from this run's in "
                         + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in diff.items()))
    with torch.no_grad():
        for p, q in zip(model.parameters(), saved.parameters(), strict=True):
            p.copy_(q)


def load_checkpoint(path: str, device: str = "cpu", **overrides) -> NSAModel:
    """A model from a checkpoint folder (its latest step) or a .safetensors file."""
    if os.path.isdir(path):
        info = _read_pointer(path)
        if info is None:
            raise ValueError(f"{path!r} holds no checkpoint.json")
        path = os.path.join(path, info["model"])
    return load_model(path, device=device, **overrides).eval()


# --------------------------------------------------------------------------- needle
NEEDLE_SEED = 1234  # the needle grid's samples: the same in every run


def needle_example(task: PasskeyTask, context_len: int, depth_index: int, depth: float, sample: int,
                   seed: int = NEEDLE_SEED):
    """Sample ``sample`` of the grid cell (context_len, depths[depth_index] = depth):
    (tokens, answer_start, key) of :meth:`PasskeyTask.example`."""
    from .data import _rng

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
    """Accuracy of each model over ``args.contexts`` x ``args.depths``."""
    from tqdm import tqdm

    train_len = getattr(args, "seq_len", None) or 256
    contexts = _ints(args.contexts) if args.contexts else sorted({max(128, train_len // 3), 2 * train_len // 3,
                                                                  train_len, 2 * train_len})
    depths = [float(x) for x in args.depths.split(",")]
    if any(not 0 <= x <= 1 for x in depths):
        raise ValueError(f"--depths must lie in [0, 1], got {depths}")
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
            result["models"][name] = {"accuracy": acc, "attention": c.attention, "window": c.window,
                                      "config": c.to_dict()}
    return result


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None
    if any(x <= 0 for x in v):
        raise ValueError(f"expected positive integers, got {s!r}")
    return v


def _report(grid: dict, out_stem: str) -> None:
    """Print the grid, the accuracy beyond the window, and write OUT.json and OUT.png."""
    os.makedirs(os.path.dirname(out_stem) or ".", exist_ok=True)
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
    with open(out_stem + ".json", "w") as f:
        json.dump(grid, f, indent=1)
    plot_heatmap(grid, out_stem + ".png")
    print(f"wrote {out_stem}.json and {out_stem}.png")


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
    device = _device(args.device, Dist())
    models = {}
    for path in args.checkpoints:
        m = load_checkpoint(path, device)
        name = m.config.attention
        models[name if name not in models else f"{name}:{path}"] = m
    if args.contexts is None:
        args.seq_len = max(m.config.max_seq_len for m in models.values()) // 4
    _report(needle_grid(models, args, device), args.out)
    return 0


# --------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    device = _device(args.device, Dist())
    model = load_checkpoint(args.checkpoint, device)
    prompt = args.prompt
    if prompt is None:
        import numpy as np

        toks, a, key = PasskeyTask(256).example(256, 0.2, np.random.default_rng(args.seed))
        prompt = decode(toks[:a])
        print(f"(passkey prompt of {a} bytes; the key is {key})")
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = encode(prompt)[None].to(device)
    y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, use_cache=not args.no_cache, generator=g,
                       cuda_graph=args.cuda_graph)
    import sys

    on, off = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")  # bold the new text
    print(prompt + on + decode(y[0, x.shape[1]:].tolist()) + off)
    return 0
