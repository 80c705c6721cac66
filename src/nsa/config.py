"""Configuration of an NSA attention layer (names follow docs/semantics.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

COMPRESS = ("mean", "mlp")


def check_positive_int(name: str, v) -> None:
    """ValueError naming ``name`` unless v is a positive int (a bool is not an int here)."""
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass
class NSAConfig:
    """Hyper-parameters of :class:`nsa.NSAAttention`. Defaults are the paper's (section 4.1).

    Attributes:
        d_model: width of the layer's input and output.
        n_heads: query heads HQ.
        n_kv_heads: key/value heads H (GQA groups); n_heads must be a multiple.
        head_dim: query/key head dim Dk.
        v_head_dim: value head dim Dv (defaults to head_dim when None).
        cmp_block: compression block length l.
        cmp_stride: compression stride d; divides cmp_block and sel_block.
        sel_block: selection block length l'.
        sel_count: selected blocks per query n, forced blocks included (>= 3).
        window: sliding window w, the query included.
        compress: phi, "mean" or "mlp" (MLP with intra-block position embedding,
            initialised equal to "mean").
        shared_kv: one k/v projection for all three branches instead of one per branch.
        rope_theta: RoPE base.
        gate_hidden: hidden width of the gate MLP; 0 makes the gate a single linear layer.
        scale: softmax scale, default 1/sqrt(head_dim).
        backend: kernel backend for the attention op: "auto", "torch" or "triton".
        bias: whether the projections have biases.
        deterministic: bitwise-repeatable gradients from the Triton backward
            (``nsa.nsa_func(deterministic=...)``).
    """

    d_model: int = 2560
    n_heads: int = 64
    n_kv_heads: int = 4
    head_dim: int = 192
    v_head_dim: int | None = 128
    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    sel_count: int = 16
    window: int = 512
    compress: str = "mlp"
    shared_kv: bool = False
    rope_theta: float = 10000.0
    gate_hidden: int = 0
    scale: float | None = None
    backend: str = "auto"
    bias: bool = False
    deterministic: bool = False

    def __post_init__(self):
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        for name in ("d_model", "n_heads", "n_kv_heads", "head_dim", "v_head_dim", "cmp_block",
                     "cmp_stride", "sel_block", "sel_count", "window"):
            check_positive_int(f"NSAConfig.{name}", getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"NSAConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"NSAConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.cmp_block % self.cmp_stride or self.sel_block % self.cmp_stride:
            raise ValueError(f"NSAConfig.cmp_stride ({self.cmp_stride}) must divide cmp_block "
                             f"({self.cmp_block}) and sel_block ({self.sel_block})")
        if self.sel_count < 3:
            raise ValueError(f"NSAConfig.sel_count must be >= 3 (three forced blocks), got {self.sel_count}")
        if self.compress not in COMPRESS:
            raise ValueError(f"NSAConfig.compress must be one of {COMPRESS}, got {self.compress!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"NSAConfig.backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        if not isinstance(self.gate_hidden, int) or self.gate_hidden < 0:
            raise ValueError(f"NSAConfig.gate_hidden must be an int >= 0, got {self.gate_hidden!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"NSAConfig.deterministic must be a bool, got {self.deterministic!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"NSAConfig.rope_theta must be > 0, got {self.rope_theta}")

    def to_dict(self) -> dict:
        return asdict(self)
