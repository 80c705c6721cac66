"""What the commands share: argument types, the device, torchrun's processes (DDP / FSDP2) and
output paths.

A bad value is a user error: the argument types raise ``argparse.ArgumentTypeError`` (argparse
names the option) and the other checks a ``ValueError`` naming the option, which ``nsa``'s
``main`` prints as one line ``nsa: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------- torch.compile
# torch.compile's modes; "reduce-overhead" and "max-autotune" replay CUDA graphs, which take a
# small model's training step off Python's kernel launches
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model, mode: str):
    """``torch.compile(model)`` (inductor) in one of :data:`COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)


def compiled_step_begin(mode: str | None) -> None:
    """Before each training step of a model compiled with CUDA graphs: the previous step's
    graph outputs may be overwritten (torch.compiler.cudagraph_mark_step_begin)."""
    if mode in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()


# --------------------------------------------------------------------------- argument types
def _number(kind, s: str):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {s!r}") from None


def positive_int(s: str) -> int:
    v = _number(int, s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def nonnegative_int(s: str) -> int:
    v = _number(int, s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = _number(float, s)
    if not v > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {s!r}")
    return v


def nonnegative_float(s: str) -> float:
    v = _number(float, s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s!r}")
    return v


def fraction(s: str) -> float:
    """A number in [0, 1]."""
    v = _number(float, s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {s!r}")
    return v


def open_fraction(s: str) -> float:
    """A number in (0, 1]."""
    v = _number(float, s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s!r}")
    return v


def comma_list(item):
    """A type for comma-separated values, each parsed by ``item`` (another type here)."""
    def parse(s: str) -> list:
        parts = [x.strip() for x in s.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {s!r}")
        return [item(x) for x in parts]

    return parse


# --------------------------------------------------------------------------- output paths
def out_folder(path: str, option: str = "--out") -> str:
    """Create the folder ``path`` (and its parents) for a command's output; a ValueError naming
    ``option`` when it is a file or cannot be created or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path!r}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path!r}: the folder is not writable")
    return path


def out_stem(stem: str, suffixes: tuple[str, ...], option: str = "--out") -> str:
    """Check that ``stem + suffix`` can be written for each suffix (its folder is made)."""
    out_folder(os.path.dirname(stem) or ".", f"{option} {stem!r}: the folder")
    for sfx in suffixes:
        if os.path.isdir(stem + sfx):
            raise ValueError(f"{option} {stem!r}: {stem + sfx!r} is a folder")
    return stem


# --------------------------------------------------------------------------- devices, processes
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


def resolve_device(arg: str | None, d: Dist) -> str:
    """``--device``: cpu or cuda (default: cuda when available); under torchrun each process
    takes its LOCAL_RANK's GPU."""
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


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum of ``x`` over the processes (``x`` itself in one process)."""
    if d.world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def wrap_model(model, fsdp: bool, d: Dist, device: str):
    """DDP (default) or FSDP2 (``fsdp``) around the model when distributed; the model itself otherwise."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device] if device.startswith("cuda") else None)


def is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)
