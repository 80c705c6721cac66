"""Training checkpoints: atomic saves, exact resume, weights for ``--init`` and for the commands.

A run's folder holds ``model-STEP.safetensors`` (weights, written by the library's
:func:`nsa.model.save_weights`, so :func:`nsa.model.load_model` reads it), ``state-STEP.pt``
(optimizer, RNG, step, the run's arguments) and ``checkpoint.json``, which points at the latest
pair. Each file is written to a temporary name and renamed (:func:`nsa.model.atomic_write`), the
pointer last: a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import time

import torch

from ..model import NSAModel, atomic_write, load_model, load_weights, save_weights
from .runtime import Dist, is_fsdp


def _full_state(model, opt):
    """Model and optimizer state dicts, whole (gathered from FSDP2 shards when sharded)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
    return model.state_dict(), opt.state_dict()


def save_checkpoint(out, model, opt, step, args, d: Dist, loss: float) -> None:
    """Write ``model-STEP.safetensors`` (weights) and ``state-STEP.pt`` (optimizer, RNG, step),
    then point ``checkpoint.json`` at them (an atomic rename): a crash at any moment leaves
    the previous checkpoint whole. Every process calls it (FSDP2 gathers); rank 0 writes."""
    sd, osd = _full_state(model, opt)
    if not d.main:
        return
    os.makedirs(out, exist_ok=True)
    mname, sname = f"model-{step:07d}.safetensors", f"state-{step:07d}.pt"
    save_weights(os.path.join(out, mname), model.config, sd, extra={"step": step})
    state = {"optimizer": osd, "step": step, "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "args": {k: v for k, v in vars(args).items() if k != "func"}}
    atomic_write(os.path.join(out, sname), lambda p: torch.save(state, p))
    info = {"step": step, "model": mname, "state": sname, "loss": loss,
            "config": model.config.to_dict(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    old = read_pointer(out)

    def write_json(p):
        with open(p, "w") as f:
            json.dump(info, f, indent=1)

    atomic_write(os.path.join(out, "checkpoint.json"), write_json)
    if old and old["step"] != step:  # the previous checkpoint is no longer pointed at
        for key in ("model", "state"):
            try:
                os.remove(os.path.join(out, old[key]))
            except FileNotFoundError:
                pass


def read_pointer(out: str) -> dict | None:
    """The folder's ``checkpoint.json`` (None when there is none)."""
    p = os.path.join(out, "checkpoint.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


# options added after runs were saved: such a run ran with the default
_ADDED_LATER = {"near_needles": 0.0}


def resume_checkpoint(out, model, opt, args, d: Dist) -> int:
    """Restore the weights, optimizer and RNG of ``out``'s latest checkpoint; returns its step.
    The options that shape the run (data, schedule, batch) must be the saved run's."""
    info = read_pointer(out)
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
    if is_fsdp(model):
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


def init_path(path: str, kind: str) -> str:
    """--init's checkpoint for one attention kind: PATH/KIND when PATH holds one per kind."""
    sub = os.path.join(path, kind)
    return sub if os.path.isdir(sub) else path


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"attn": {"window": 32}}`` -> ``{"attn.window": 32}``."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def init_weights(model: NSAModel, path: str) -> None:
    """Copy a checkpoint's weights into ``model``, whose architecture must be the same (every
    config field but max_seq_len and backend, which change no weight)."""
    saved = load_checkpoint(path)
    c = model.config
    same = saved.config.replace(max_seq_len=c.max_seq_len, backend=c.attn.backend)
    if same != c:
        a, b = _flat(same.to_dict()), _flat(c.to_dict())
        raise ValueError(f"--init {path!r}: its config differs from this run's in "
                         + ", ".join(f"{k} (saved {a[k]!r}, now {b[k]!r})" for k in a if a[k] != b[k]))
    with torch.no_grad():
        for p, q in zip(model.parameters(), saved.parameters(), strict=True):
            p.copy_(q)


def load_checkpoint(path: str, device: str = "cpu", **overrides) -> NSAModel:
    """A model (in eval mode) from a checkpoint folder (its latest step), a .safetensors file or
    a transformers folder (``config.json``, what ``NSAForCausalLM.save_pretrained`` writes; read
    by :func:`nsa.hf.load_folder`, which needs ``nsa[hf]``); ``overrides`` replace config fields
    (:meth:`nsa.model.ModelConfig.replace`)."""
    if os.path.isdir(path):
        info = read_pointer(path)
        if info is None and os.path.isfile(os.path.join(path, "config.json")):
            try:
                from ..hf import load_folder
            except ImportError:
                raise ValueError(f"{path!r} is a transformers folder (config.json); reading it needs "
                                 "transformers: pip install 'nsa[hf]'") from None
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the commands' stderr keeps one-line errors
            return load_folder(path, device, **overrides)
        if info is None:
            kinds = sorted(k for k in os.listdir(path) if os.path.exists(os.path.join(path, k, "checkpoint.json")))
            hint = f" (its subfolders {', '.join(kinds)} do: pass one of them)" if kinds else ""
            raise ValueError(f"{path!r} holds no checkpoint.json{hint}")
        path = os.path.join(path, info["model"])
    return load_model(path, device=device, **overrides).eval()
