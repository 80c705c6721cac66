"""Rotary position embedding (LLaMA's half-split form) at explicit positions."""

from __future__ import annotations

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
