"""Rotary position embedding (LLaMA's half-split form) at explicit positions."""

from __future__ import annotations

import functools

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0,
                 dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, dim // 2] for integer ``positions``."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B or 1, T, D/2] (computed in fp32, cast back)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    c, s = cos[:, :, None, :].to(acc), sin[:, :, None, :].to(acc)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


@functools.lru_cache(maxsize=4)
def rope_table(n: int, dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n, 2, dim]``: for positions 0..n-1, ``[cos, cos]`` and ``[-sin, sin]`` (each half dim // 2
    wide, :func:`rope_cos_sin` in ``dtype``), for :func:`apply_rope_table`. Decode steps gather
    their rows instead of computing cos/sin; the latest tables are kept (one per geometry,
    shared by every layer)."""
    cos, sin = rope_cos_sin(torch.arange(n, device=device), dim, theta, dtype=dtype)
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], 1)


def apply_rope_table(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rotate x ``[B, T, H, D]`` by ``rows = rope_table(...)[positions]`` ``[B or 1, T, 2, D]``:
    ``x * [cos, cos] + [x2, x1] * [-sin, sin]``, bit for bit :func:`apply_rope` (the same
    products in the table's dtype, a sum's operands swapped, a subtraction as the addition of a
    negated product), in 5 kernels instead of 10: a decode step replayed as a CUDA graph pays
    per launch."""
    c, s = rows[:, :, None, 0], rows[:, :, None, 1]
    return (x * c + x.roll(x.shape[-1] // 2, -1) * s).to(x.dtype)
