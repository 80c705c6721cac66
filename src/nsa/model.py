"""A small LLaMA-style decoder with Native Sparse Attention (and two baselines).

Read top to bottom: the config and its presets, RMSNorm, SwiGLU, the attention choices
(``"nsa"``: :class:`nsa.NSAAttention`; ``"full"`` and ``"window"``: plain causal softmax
attention over all keys or over the last ``window`` keys, from the same config), the
decoder block, the model with its KV cache and :meth:`NSAModel.generate`, and safetensors
checkpoints.

The three attention kinds share every other weight shape, so one config trains NSA and
its baselines side by side (``ModelConfig.preset("tiny", attention="window")``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import Field, asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .config import NSAConfig, check_positive_int
from .cache import kept
from .layer import NSAAttention, check_decode_step
from .rope import apply_rope, apply_rope_table, rope_cos_sin, rope_table

ATTENTIONS = ("nsa", "full", "window")


# --------------------------------------------------------------------------- config
def _tiny_attn() -> NSAConfig:
    """A default ModelConfig's attention layer: a CPU-sized width, blocks of 16 (the rest NSAConfig's)."""
    return NSAConfig(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, v_head_dim=32, cmp_block=16,
                     cmp_stride=8, sel_block=16, sel_count=4, window=32)


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`NSAModel`.

    Attributes:
        vocab_size: tokens (256: bytes).
        n_layers: depth.
        ffn_hidden: SwiGLU hidden width; 0 picks LLaMA's 8/3 * attn.d_model rounded up to 32.
        max_seq_len: the longest sequence the model is meant for (the default cache size).
        attention: "nsa", "full" (causal over every key) or "window" (causal over the last
            ``attn.window`` keys, NSA's window branch alone).
        attn: the attention layer's :class:`nsa.NSAConfig`: the model width ``d_model``, heads,
            head dims, RoPE base, NSA geometry (semantics names l, d, l', n, w, phi) and kernel
            ``backend``. The full and window baselines take their width, heads, head dim,
            ``rope_theta`` and (window) ``window`` from it, and need ``v_head_dim == head_dim``,
            no ``scale`` and no ``bias``.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the input embedding with the output projection.
        token_shift: add a learned projection of the previous token's embedding to each
            token's (RWKV's token shift, modded-nanogpt's "smear"). Keys then know their
            predecessor, so copying after a match ("induction") needs one attention layer
            instead of two composed ones: the tiny model learns retrieval in minutes.
        init_std: std of the normal init of linear and embedding weights.

    :meth:`replace`, :meth:`preset` and :meth:`from_dict` take the fields of ``attn`` flat
    (``window=64``) or dotted (``"attn.window"``).
    """

    vocab_size: int = 256
    n_layers: int = 2
    ffn_hidden: int = 0
    max_seq_len: int = 1024
    attention: str = "nsa"
    attn: NSAConfig = field(default_factory=_tiny_attn)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    token_shift: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_layers", "max_seq_len"):
            check_positive_int(f"ModelConfig.{name}", getattr(self, name))
        if not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 0:
            raise ValueError(f"ModelConfig.ffn_hidden must be an int >= 0, got {self.ffn_hidden!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not isinstance(self.attn, NSAConfig):
            raise TypeError(f"ModelConfig.attn must be an NSAConfig, got {type(self.attn).__name__}")
        a = self.attn
        if self.attention != "nsa" and (a.v_head_dim != a.head_dim or a.scale is not None or a.bias):
            raise ValueError(f"ModelConfig.attention={self.attention!r} needs attn.v_head_dim == attn.head_dim, "
                             f"attn.scale None and attn.bias False (the dense baselines have neither), got "
                             f"v_head_dim={a.v_head_dim}, head_dim={a.head_dim}, scale={a.scale}, bias={a.bias}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("ModelConfig.norm_eps and ModelConfig.init_std must be > 0")

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden or 32 * math.ceil(8 * self.attn.d_model / 3 / 32)

    @classmethod
    def find_field(cls, name: str) -> tuple[bool, Field]:
        """(whether it is a field of ``attn``, the dataclass field) for ``name``: a ModelConfig
        field, an NSAConfig field named flat (``window``) or dotted (``attn.window``)."""
        own = {f.name: f for f in fields(cls)}
        inner = {f.name: f for f in fields(NSAConfig)}
        if name in own:
            return False, own[name]
        key = name.removeprefix("attn.")
        if key in inner:
            return True, inner[key]
        raise ValueError(f"ModelConfig has no field {name!r}; fields: {sorted(own)}, and attn's "
                         f"{sorted(inner)} (flat or as attn.NAME)")

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (validated again). The fields of ``attn`` may be named
        flat (``window=64``) or dotted (``**{"attn.window": 64}``); ``head_dim`` sets
        ``v_head_dim`` too unless that is given (the model's presets have Dv = Dk)."""
        own, inner = {}, {}
        for name, v in changes.items():
            in_attn, f = self.find_field(name)
            (inner if in_attn else own)[f.name] = v
        if "head_dim" in inner and "v_head_dim" not in inner:
            inner["v_head_dim"] = inner["head_dim"]
        attn = own.pop("attn", self.attn)
        return dataclasses.replace(self, attn=dataclasses.replace(attn, **inner) if inner else attn, **own)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see :data:`PRESETS`) with some fields replaced (see :meth:`replace`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def to_dict(self) -> dict:
        """The fields, ``attn`` as a nested dict (what checkpoints store as JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict`. Also reads the flat dicts of checkpoints written before
        ``attn`` was nested (``{"d_model": 128, "window": 32, ...}``; their v_head_dim was
        head_dim, as :meth:`replace` sets it). Keys that name no field (fields dropped since)
        are ignored; fields that ``d`` lacks keep a default ModelConfig's values."""
        inner = {f.name for f in fields(NSAConfig)}
        known = ({f.name for f in fields(cls)} - {"attn"}) | inner
        flat = {k: v for k, v in d.items() if k in known}
        flat.update({f"attn.{k}": v for k, v in d.get("attn", {}).items() if k in inner})
        return cls().replace(**flat)


# "tiny" trains on a 2-core CPU in minutes at a few hundred tokens of context: blocks of 16,
# a window of 32 and 8 selected blocks (3 forced, 5 free), so a needle more than 32 tokens back is reachable
# only through the compressed and selected branches. The GPU presets use the paper's
# geometry (l=32, d=16, l'=64, n=16, w=512, NSAConfig's defaults) at 4k-16k tokens; "small" did not learn the
# passkey task in 2666 steps at 2048 tokens on an H100, while "tiny" learnt it there
# (benchmarks/results/needle_gpu_h100.json). A larger init (0.08, not
# GPT-2's 0.02) makes attention peaked enough from the start that the tiny model leaves the
# plateau of uniform attention within a hundred steps instead of thousands. RoPE base 1e6 (not
# 1e4): with head_dim 32 the slowest pairs barely turn over 16k tokens; it took the GPU needle
# from 0 to 1.00 at 8k (needle_gpu_h200.json) and, on the CPU, 2x the training length from 0.71
# to 0.94 (needle_tiny_cpu.json).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(n_layers=2, max_seq_len=1024, init_std=0.08, attn=NSAConfig(
        d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, v_head_dim=32, cmp_block=16, cmp_stride=8,
        sel_block=16, sel_count=8, window=32, rope_theta=1e6)),
    "small": ModelConfig(n_layers=4, max_seq_len=16384, init_std=0.05, attn=NSAConfig(
        d_model=384, n_heads=8, n_kv_heads=2, head_dim=64, v_head_dim=64)),
    "base": ModelConfig(n_layers=12, max_seq_len=65536, attn=NSAConfig(
        d_model=768, n_heads=16, n_kv_heads=4, head_dim=64, v_head_dim=64)),
}


# --------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 so bf16 activations keep their scale
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass
class KVCache:
    """Cache of one dense attention layer: keys/values of every position so far."""
    k: torch.Tensor  # [B, max_seq_len, H, D], RoPE applied
    v: torch.Tensor
    length: int = 0
    kept: dict = field(default_factory=dict, repr=False, compare=False)  # as NSACache's

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.length = 0


class DenseAttention(nn.Module):
    """Causal softmax attention with RoPE and GQA: over every earlier key (``window=None``,
    the "full" baseline) or over keys u in [t - window + 1, t] (the "window" baseline,
    the same function as NSA's window branch, semantics §6)."""

    def __init__(self, config: NSAConfig, window: int | None):
        super().__init__()
        c = config  # widths, heads and RoPE base; the NSA geometry is unused
        self.n_heads, self.n_kv, self.head_dim, self.theta = c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta
        self.window = window
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.kv_proj = nn.Linear(c.d_model, 2 * c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def new_cache(self, batch_size: int, max_seq_len: int, *, dtype=None, device=None) -> KVCache:
        p = self.q_proj.weight
        shape = (batch_size, max_seq_len, self.n_kv, self.head_dim)
        kw = dict(dtype=dtype or p.dtype, device=device or p.device)
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, HQ, D = self.n_kv, self.n_heads, self.head_dim
        s = 0 if cache is None else cache.length
        if cache is not None and s + T > cache.max_seq_len:
            raise ValueError(f"cache is full: it holds {s} of max_seq_len={cache.max_seq_len} "
                             f"positions and cannot take {T} more")
        cos, sin = rope_cos_sin(torch.arange(s, s + T, device=x.device)[None], D, self.theta)
        q = apply_rope(self.q_proj(x).view(B, T, HQ, D), cos, sin)
        k, v = self.kv_proj(x).view(B, T, 2, H, D).unbind(2)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[:, s:s + T] = k.to(cache.k.dtype)
            cache.v[:, s:s + T] = v.to(cache.v.dtype)
            cache.length = s + T
            k, v = cache.k[:, :s + T].to(q.dtype), cache.v[:, :s + T].to(q.dtype)
        o = self._attend(q, k, v, q_offset=s)
        return self.o_proj(o.reshape(B, T, HQ * D))

    @torch.no_grad()
    def decode_step(self, x: torch.Tensor, cache: KVCache, seqlens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence at positions ``seqlens`` (int tensor [B] on the device),
        fixed shapes and no host sync, as :meth:`nsa.NSAAttention.decode_step`: the query
        attends over the whole preallocated cache with a "may attend" mask built on the
        device (keys at positions <= its own, and within the window), as gpt-fast does."""
        B = x.shape[0]
        H, HQ, D = self.n_kv, self.n_heads, self.head_dim
        check_decode_step(x, self.q_proj.in_features, cache.k.shape[0], seqlens)
        s = seqlens.long()
        k, v = self.kv_proj(x).view(B, 1, 2, H, D).unbind(2)
        # q and k rotated in one pass by rows of a cos/sin table, as NSA's step does
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        qk = torch.cat([self.q_proj(x).view(B, 1, HQ, D), k], 2)
        if torch.compiler.is_compiling():  # traced: computed in the graph (fused), no table
            qk = apply_rope(qk, *rope_cos_sin(s[:, None], D, self.theta, dtype=acc))
        else:
            rope = kept(cache, ("rope", D, self.theta, acc),
                        lambda: rope_table(cache.max_seq_len, D, self.theta, x.device, acc))
            qk = apply_rope_table(qk, rope[s[:, None]])
        q, k = qk.split([HQ, H], 2)
        rows = torch.arange(B, device=x.device)
        cache.k[rows, s] = k[:, 0].to(cache.k.dtype)
        cache.v[rows, s] = v[:, 0].to(cache.v.dtype)
        u = torch.arange(cache.max_seq_len, device=x.device)[None]  # [1, max]
        ok = (u <= s[:, None]) & (u > s[:, None] - (self.window or cache.max_seq_len))  # [B, max]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k.to(q.dtype).transpose(1, 2),
                                           cache.v.to(q.dtype).transpose(1, 2), attn_mask=ok[:, None, None, :],
                                           enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, 1, HQ * D))

    def _attend(self, q, k, v, q_offset: int) -> torch.Tensor:
        """q [B, Tq, HQ, D] at positions q_offset.., k/v [B, Tk, H, D] at positions 0.."""
        rep = self.n_heads // self.n_kv
        q = q.transpose(1, 2)
        k = k.repeat_interleave(rep, dim=2).transpose(1, 2)
        v = v.repeat_interleave(rep, dim=2).transpose(1, 2)
        Tq, Tk = q.shape[2], k.shape[2]
        if self.window is None and q_offset == 0 and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        # Explicit "may attend" masks: with a cache the queries sit at the bottom right
        # (is_causal would align them top-left). Every row sees at least its own key, so no
        # row is empty. The window reads only the keys it can see, chunk by chunk.
        w = self.window or Tk
        step = max(w, 256)
        outs = []
        for c0 in range(0, Tq, step):
            c1 = min(Tq, c0 + step)
            t = torch.arange(c0, c1, device=q.device) + q_offset
            k0 = max(0, c0 + q_offset - w + 1)
            u = torch.arange(k0, c1 + q_offset, device=q.device)
            mask = (u[None, :] <= t[:, None]) & (u[None, :] > t[:, None] - w)
            outs.append(F.scaled_dot_product_attention(q[:, :, c0:c1], k[:, :, k0:c1 + q_offset],
                                                       v[:, :, k0:c1 + q_offset], attn_mask=mask))
        return torch.cat(outs, 2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, dim = config, config.attn.d_model
        self.attn_norm = RMSNorm(dim, c.norm_eps)
        if c.attention == "nsa":
            self.attn = NSAAttention(c.attn)
        else:
            self.attn = DenseAttention(c.attn, None if c.attention == "full" else c.attn.window)
        self.mlp_norm = RMSNorm(dim, c.norm_eps)
        self.mlp = SwiGLU(dim, c.ffn_dim)

    def forward(self, x: torch.Tensor, cache=None, seqlens: torch.Tensor | None = None,
                cu_seqlens=None) -> torch.Tensor:
        h = self.attn_norm(x)
        # seqlens: a decode step with the lengths on the device (the attention's decode_step)
        if seqlens is not None:
            a = self.attn.decode_step(h, cache, seqlens)
        elif cu_seqlens is not None:  # packed sequences (NSA only: checked by the model)
            a = self.attn(h, cu_seqlens=cu_seqlens)
        else:
            a = self.attn(h, cache=cache)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------- model
class NSAModel(nn.Module):
    """Decoder-only language model: ``model(tokens) -> logits`` ``[B, T, vocab_size]``.

    ``model(chunk, cache=cache)`` continues the sequences held by ``cache`` (from
    :meth:`new_cache`): any split into chunks gives the logits of one full pass.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        dim = c.attn.d_model
        self.embed = nn.Embedding(c.vocab_size, dim)
        self.shift = nn.Linear(dim, dim, bias=False) if c.token_shift else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(dim, c.norm_eps)
        self.lm_head = nn.Linear(dim, c.vocab_size, bias=False)
        self._init_weights()
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._decode_compiled = None  # torch.compile of decode_step, made by the first generate(compile=True)

    def _init_weights(self) -> None:
        c = self.config
        # GPT-2 style: N(0, std), the projections into the residual stream scaled down by
        # depth. The NSA compressor (whose zero init makes "mlp" start as "mean") and the
        # gate keep the layer's own init.
        for name, m in self.named_modules():
            if isinstance(m, nn.Embedding) or (isinstance(m, nn.Linear) and not (
                    ".phi_" in name or ".gate" in name and "gate_up" not in name)):
                std = c.init_std / math.sqrt(2 * c.n_layers) if name.endswith(("o_proj", "down")) else c.init_std
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, *, dtype=None,
                  device=None) -> "ModelCache":
        """One preallocated cache per layer for ``batch_size`` sequences."""
        n = self.config.max_seq_len if max_seq_len is None else max_seq_len
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        layers = [b.attn.new_cache(batch_size, n, dtype=dtype, device=device) for b in self.blocks]
        return ModelCache(layers, torch.zeros(batch_size, dtype=torch.int64, device=device or self.embed.weight.device))

    def varlen_tables(self, cu_seqlens: torch.Tensor):
        """:func:`nsa.varlen_tables` of ``cu_seqlens`` for this model's attention geometry: what
        ``model(tokens, cu_seqlens=...)`` takes inside ``torch.compile`` (built outside it)."""
        from .ops import varlen_tables

        return varlen_tables(cu_seqlens, cmp_block=self.config.attn.cmp_block,
                             cmp_stride=self.config.attn.cmp_stride)

    def forward(self, tokens: torch.Tensor, cache: "ModelCache | None" = None, cu_seqlens=None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]``. ``cu_seqlens`` (NSA attention, B == 1, no cache): N
        sequences packed along T, as int32 ``[N+1]`` or the tables of :meth:`varlen_tables`
        (what a compiled step takes); each sequence is attended and token-shifted alone."""
        return self.lm_head(self.features(tokens, cache, cu_seqlens))

    def features(self, tokens: torch.Tensor, cache: "ModelCache | None" = None, cu_seqlens=None) -> torch.Tensor:
        """The final norm's output ``[B, T, d_model]``, what ``lm_head`` maps to the logits of
        :meth:`forward` (same arguments): a caller that needs the logits of a few positions
        only (the last one when generating) projects just those."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [B, T], got {shape}")
        if cache is not None and not isinstance(cache, ModelCache):
            raise TypeError(f"cache must come from NSAModel.new_cache, got {type(cache).__name__}")
        tables = None
        if cu_seqlens is not None:
            if cache is not None or self.config.attention != "nsa":
                raise ValueError(f"cu_seqlens needs attention='nsa' and no cache, got attention="
                                 f"{self.config.attention!r}{' and a cache' if cache is not None else ''}")
            from .ops import as_varlen_tables

            a = self.config.attn
            tables = as_varlen_tables(cu_seqlens, tokens.shape[1], tokens.shape[0], tokens.device,
                                      a.cmp_block, a.cmp_stride)
        x = self.embed(tokens)
        if self.shift is not None:
            # previous token's embedding; zero before position 0, the cached token after it
            prev = torch.cat([self.embed(cache.last[:, None]) if cache is not None and cache.length
                              else torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
            if tables is not None:  # zero before each sequence's position 0 too
                prev = prev * (tables.positions != 0)[None, :, None].to(prev.dtype)
            x = x + self.shift(prev)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache.layers[i], cu_seqlens=tables)
        if cache is not None:
            cache.last = tokens[:, -1].clone()
            cache.length += tokens.shape[1]
        return self.norm(x)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: "ModelCache", seqlens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab_size]`` of one new token per sequence (``tokens`` ``[B, 1]``) at
        positions ``seqlens`` (int tensor ``[B]`` on the device, advanced by one in place).

        Fixed shapes and no host sync (see :meth:`nsa.NSAAttention.decode_step` and
        :meth:`DenseAttention.decode_step`): what :meth:`generate` captures in a CUDA graph.
        Needs a cache that holds at least one token (``cache.length`` is left as it is).
        """
        x = self.embed(tokens)
        if self.shift is not None:
            x = x + self.shift(self.embed(cache.last[:, None]))
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, cache=layer_cache, seqlens=seqlens)
        cache.last.copy_(tokens[:, -1])
        seqlens.add_(1)
        return self.lm_head(self.norm(x))[:, -1]

    def compiled_decode_step(self):
        """:meth:`decode_step` through ``torch.compile`` (inductor, ``fullgraph``), made on the first
        call and kept (what ``generate(compile=True)`` captures). Shapes are automatically dynamic:
        a second batch size or cache length recompiles once with symbolic sizes, which every later
        one reuses (static shapes recompiled per length and failed at torch's recompile limit, the
        ninth)."""
        if self._decode_compiled is None:
            self._decode_compiled = torch.compile(self.decode_step, fullgraph=True)
        return self._decode_compiled

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
             cu_seqlens=None):
        """Mean cross-entropy of next tokens (targets -100 are ignored); ``weights`` [B, T]
        weigh positions (a weighted mean); ``cu_seqlens`` as :meth:`forward` takes it."""
        logits = self(tokens, cu_seqlens=cu_seqlens).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        w = (targets.flatten() != -100).float()
        if weights is not None:
            w = w * weights.flatten().float()
        return (ce * w).sum() / w.sum().clamp_min(1e-8)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, stop_token: int | None = None,
                 cuda_graph: bool = False, compile: bool = False) -> torch.Tensor:
        """Continue ``prompt`` [B, T] by ``max_new_tokens`` tokens; returns [B, T + new].

        ``temperature=0`` is greedy; otherwise sample from softmax(logits / temperature)
        restricted to the ``top_k`` most likely tokens and to the smallest set whose
        probability reaches ``top_p``. With ``use_cache`` the prompt is prefilled once and
        each new token is one decode step; without it every step reruns the whole sequence
        (the same tokens, much slower: a check of the cache). Generation stops early when
        every sequence has produced ``stop_token``.

        ``cuda_graph=True`` (CUDA, ``use_cache``; NSA on the Triton backend): the decode step is
        captured once in a CUDA graph (:meth:`decode_step`) and replayed for every token, so
        a step costs its GPU time instead of dozens of launches a layer from Python. The same tokens
        as without it, up to the last bits of the logits. The full and window baselines attend
        over the whole preallocated cache under a mask in that mode.

        ``compile=True`` (with ``cuda_graph``): the step is compiled first with ``torch.compile``
        (inductor, ``fullgraph``), so the graph replays a few fused kernels a layer instead of
        dozens of small ones. The first call pays the compilation (tens of seconds); the model
        keeps the compiled step for later calls (:meth:`compiled_decode_step`: the first new batch
        size or cache length recompiles once, with dynamic shapes that later ones reuse).
        """
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be a non-empty integer tensor [B, T], got "
                             f"{tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if compile and not cuda_graph:
            raise ValueError("compile=True needs cuda_graph=True: the compiled step is what the graph replays")
        if cuda_graph:
            if not (use_cache and prompt.is_cuda):
                raise ValueError("cuda_graph=True needs use_cache=True and a CUDA prompt, got "
                                 f"use_cache={use_cache}, device {prompt.device}")
            from .ops import resolve_backend

            if self.config.attention == "nsa" and (resolve_backend(self.config.attn.backend, prompt.device) != "triton"
                                                   or self.embed.weight.dtype == torch.float64):
                raise ValueError("cuda_graph=True needs the Triton decode (backend 'auto' or 'triton', "
                                 "not float64): the PyTorch one reads the lengths back to the host")
        B, T = prompt.shape
        out = prompt
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        logits = self(prompt, cache=cache)[:, -1]
        step = _GraphedStep(self, cache, T, compile) if cuda_graph and max_new_tokens > 1 else None
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt[:, None]], 1)
            if stop_token is not None:
                done |= nxt == stop_token
                if bool(done.all()):
                    break
            if out.shape[1] == T + max_new_tokens:
                break
            if step is not None:
                logits = step(nxt)
            else:
                logits = (self(nxt[:, None], cache=cache) if use_cache else self(out))[:, -1]
        if step is not None:
            step.finish()
        return out


class _GraphedStep:
    """NSAModel.decode_step captured in a CUDA graph: static token and length buffers, the
    first call run eagerly on a side stream (it compiles and autotunes the kernels, which a
    capture must not do) and the graph captured after it. ``compiled``: the step is the model's
    torch.compile of decode_step (made once per model)."""

    def __init__(self, model: NSAModel, cache: "ModelCache", length: int, compiled: bool = False):
        self.cache = cache
        self.step = model.decode_step
        if compiled:
            self.step = model.compiled_decode_step()
        B, dev = cache.last.shape[0], cache.last.device
        self.tok = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.seqlens = torch.full((B,), length, dtype=torch.int64, device=dev)
        self.graph, self.logits, self.steps = None, None, 0

    def __call__(self, nxt: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(nxt[:, None])
        self.steps += 1
        if self.graph is None and self.steps == 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.step(self.tok, self.cache, self.seqlens)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:  # capture records the step without running it
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.tok, self.cache, self.seqlens)
        self.graph.replay()
        return self.logits

    def finish(self) -> None:
        """Bring the cache's host-side length up to date for later chunked calls."""
        self.cache.length += self.steps
        for layer in self.cache.layers:
            layer.length += self.steps


@dataclass
class ModelCache:
    """The model's decoding state: each layer's KV cache and the last token seen."""
    layers: list
    last: torch.Tensor  # [B] int64, for the token shift
    length: int = 0


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------- checkpoints
def atomic_write(path: str, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a crash
    at any moment leaves the old file or the new one whole, never a part (nor the temporary)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_weights(path: str, config: ModelConfig, state_dict: dict, extra: dict | None = None) -> None:
    """The state dict of an :class:`NSAModel` of ``config`` to ``path`` (safetensors; the config and
    ``extra`` as JSON in its metadata), atomically (:func:`atomic_write`). A tied ``lm_head.weight``
    is left out (it is ``embed.weight``). The one writer of model weights: :func:`save_model`
    and the trainer's checkpoints (which pass the state gathered from FSDP2 shards) use it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()
               if not (config.tie_embeddings and k == "lm_head.weight")}
    meta = {"config": json.dumps(config.to_dict())}
    if extra:
        meta["extra"] = json.dumps(extra)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_model(model: NSAModel, path: str, extra: dict | None = None) -> None:
    """Weights to ``path`` (safetensors; config and ``extra`` in its metadata), atomically."""
    save_weights(path, model.config, model.state_dict(), extra)


def load_model(path: str, device=None, **overrides) -> NSAModel:
    """A model from a safetensors file written by :func:`save_weights` (config fields in
    ``overrides`` replace the saved ones, e.g. ``backend``; see :meth:`ModelConfig.replace`)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a file")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path!r} is not a safetensors file ({e})") from None
    if "config" not in meta:
        raise ValueError(f"{path!r} has no model config in its metadata: not an nsa checkpoint")
    config = ModelConfig.from_dict(json.loads(meta["config"])).replace(**overrides)
    model = NSAModel(config)
    load_weights(model, load_file(path))
    return model.to(device) if device is not None else model


def load_weights(model: NSAModel, tensors: dict) -> None:
    if model.config.tie_embeddings:
        tensors = dict(tensors, **{"lm_head.weight": tensors["embed.weight"]})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
