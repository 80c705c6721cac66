"""A Llama checkpoint to an NSA model: :func:`convert_llama` (and ``nsa convert``).

Every weight of the Llama has a place in nsa's model, shared by the three NSA branches; what
NSA adds starts from documented values (:data:`DEFAULT_GATE_INIT` and the docstring below).
"""

from __future__ import annotations

import math

import torch

from ..model import ModelConfig, NSAModel
from .configuration import NSALMConfig
from .modeling import NSAForCausalLM

# initial gate values (cmp, slc, win) of a converted NSA layer: see convert_llama
DEFAULT_GATE_INIT = (0.1, 0.45, 0.45)

# fields whose value fixes a weight's shape: the Llama's, not to be overridden
_SHAPE_FIELDS = ("vocab_size", "n_layers", "ffn_dim", "d_model", "n_heads", "n_kv_heads", "head_dim",
                 "v_head_dim", "bias", "tie_embeddings")


def llama_model_config(config, **nsa_overrides) -> ModelConfig:
    """The nsa :class:`ModelConfig` of a converted Llama of ``config`` (a ``LlamaConfig``):
    its widths, heads, depth, vocabulary, norm epsilon, RoPE base, tying and maximum length;
    NSA's geometry (l, d, l', n, w, phi) NSAConfig's defaults (the paper's); no token shift.
    ``nsa_overrides`` replace fields (flat or dotted, as :meth:`ModelConfig.replace`), except
    those that fix a weight's shape. Raises ValueError naming what nsa cannot take."""
    c = config
    if getattr(c, "model_type", None) != "llama":
        raise ValueError(f"convert_llama needs a Llama (model_type 'llama'), got model_type "
                         f"{getattr(c, 'model_type', None)!r}")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"the Llama's hidden_act is {c.hidden_act!r}: nsa's MLP is SwiGLU (silu)")
    if getattr(c, "mlp_bias", False):
        raise ValueError("the Llama has mlp_bias=True: nsa's MLP has no biases")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"the Llama's RoPE is {rope_type!r} ({rope}): nsa has plain RoPE only "
                         "(rope_type 'default')")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if heads % kv:
        raise ValueError(f"the Llama's num_attention_heads ({heads}) is not a multiple of its "
                         f"num_key_value_heads ({kv}): NSA needs whole GQA groups")
    if head_dim % 2:
        raise ValueError(f"the Llama's head_dim ({head_dim}) is odd: RoPE needs an even head_dim")
    base = dict(vocab_size=c.vocab_size, n_layers=c.num_hidden_layers, ffn_hidden=c.intermediate_size,
                max_seq_len=c.max_position_embeddings, attention="nsa", norm_eps=c.rms_norm_eps,
                tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), token_shift=False,
                init_std=getattr(c, "initializer_range", 0.02), d_model=c.hidden_size, n_heads=heads,
                n_kv_heads=kv, head_dim=head_dim, v_head_dim=head_dim, rope_theta=float(theta),
                bias=bool(getattr(c, "attention_bias", False)))
    try:
        llama = ModelConfig().replace(**base)
        out = llama.replace(**nsa_overrides)
    except ValueError as e:
        raise ValueError(f"this Llama cannot become an NSA model: {e}") from None
    for name in _SHAPE_FIELDS:
        a = getattr(llama.attn, name) if hasattr(llama.attn, name) else getattr(llama, name)
        b = getattr(out.attn, name) if hasattr(out.attn, name) else getattr(out, name)
        if a != b:
            raise ValueError(f"convert_llama: {name} is the Llama's ({a}), it cannot be overridden (got {b})")
    return out


def _logit(p: float) -> float:
    """Gate pre-activation of a probability; 0 and 1 map to -50 and 50 (sigmoid 2e-22 and 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"gate_init values must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 50.0 if p else -50.0
    return math.log(p / (1 - p))


@torch.no_grad()
def convert_llama(llama, *, gate_init=DEFAULT_GATE_INIT, **nsa_overrides) -> NSAForCausalLM:
    """An :class:`NSAForCausalLM` from a transformers ``LlamaForCausalLM``.

    Copied from the Llama: the token embedding, the output projection (or the tying), every
    RMSNorm, the SwiGLU MLPs (``gate_proj`` and ``up_proj`` stacked into nsa's ``gate_up``),
    the query and output projections, and the key/value projections into each of the three
    branches' k/v (compression, selection, window; once with ``shared_kv=True``), biases
    included; the RoPE base, the norm epsilon and the context length from its config.

    What NSA adds starts from these values:

    * Gates: the gate's (last) linear layer has zero weights and biases ``logit(gate_init)``,
      so every token starts with gates (cmp, slc, win) = ``gate_init``, default
      ``(0.1, 0.45, 0.45)``. They sum to 1: the output is a convex combination of three
      estimates of the dense attention output, with the dense output's scale. Until a sequence
      outgrows the window (w) the window branch is the Llama's attention exactly, and so is the
      selection branch until it outgrows n * l' tokens (every block selected); the compression
      branch is the coarsest, so it starts small but not at 0, where its gate would get no
      gradient. ``gate_init=(0, 0, 1)`` passes the window branch alone (logits +-50).
    * Compression (phi): the layer's own init, mean pooling of each block of l rotated keys
      (values) exactly: "mean" is the mean, "mlp" adds a zero position embedding and an MLP
      whose last layer is zero (its first layer random, PyTorch's default init).
    * The token shift, if overridden on (``token_shift=True``): zero, so it adds nothing.

    Args:
        llama: a ``LlamaForCausalLM`` (any dtype and device; the result has the same).
        gate_init: the three initial gate values in [0, 1].
        **nsa_overrides: ModelConfig fields for the NSA model (flat or dotted: ``window=2048``,
            ``sel_count=32``, ``compress="mean"``, ``shared_kv=True``, ``backend="torch"``,
            ``attention="full"`` for the dense baseline, which is the Llama itself), except
            those fixed by the Llama's weights (widths, heads, depth, vocabulary).

    Raises ValueError naming the problem for a model that is not a Llama, a Llama whose
    heads, activation, MLP biases or RoPE scaling nsa cannot take, or an override that changes
    a weight's shape.
    """
    cfg = getattr(llama, "config", None)
    if cfg is None or not hasattr(llama, "model") or not hasattr(llama, "lm_head"):
        raise ValueError(f"convert_llama needs a LlamaForCausalLM, got {type(llama).__name__}")
    if len(gate_init) != 3:
        raise ValueError(f"gate_init must be three values (cmp, slc, win), got {gate_init!r}")
    mc = llama_model_config(cfg, **nsa_overrides)
    ref = llama.model.embed_tokens.weight
    tokens = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    out = NSAForCausalLM(NSALMConfig.from_model_config(mc, **{k: v for k, v in tokens.items() if v is not None}))
    dst, src = out.model, llama.model
    dst.embed.weight.copy_(src.embed_tokens.weight)
    if not mc.tie_embeddings:
        dst.lm_head.weight.copy_(llama.lm_head.weight)
    dst.norm.weight.copy_(src.norm.weight)
    if dst.shift is not None:
        dst.shift.weight.zero_()
    for block, layer in zip(dst.blocks, src.layers, strict=True):
        block.attn_norm.weight.copy_(layer.input_layernorm.weight)
        block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)
        m = layer.mlp
        block.mlp.gate_up.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
        block.mlp.down.weight.copy_(m.down_proj.weight)
        a, s = block.attn, layer.self_attn
        copies = getattr(a, "n_branches", 1)  # nsa: per branch k then v; dense: k then v
        for name in ("weight", "bias"):
            if getattr(a.q_proj, name) is None:
                continue
            getattr(a.q_proj, name).copy_(getattr(s.q_proj, name))
            getattr(a.o_proj, name).copy_(getattr(s.o_proj, name))
            getattr(a.kv_proj, name).copy_(torch.cat([getattr(s.k_proj, name), getattr(s.v_proj, name)] * copies))
        if mc.attention == "nsa":
            last = a.gate[-1] if isinstance(a.gate, torch.nn.Sequential) else a.gate
            last.weight.zero_()
            last.bias.copy_(torch.tensor([_logit(float(p)) for p in gate_init]).repeat(mc.attn.n_heads))
    if getattr(llama, "generation_config", None) is not None:
        out.generation_config = llama.generation_config
    return out.to(device=ref.device, dtype=ref.dtype)


def convert_llama_folder(src: str, dst: str, *, gate_init=DEFAULT_GATE_INIT, **nsa_overrides) -> NSAForCausalLM:
    """``nsa convert``: read the Llama folder ``src`` (config.json and safetensors weights),
    convert it (:func:`convert_llama`) and ``save_pretrained`` it to ``dst`` with the
    tokenizer files of ``src``. Raises ValueError for a folder that is not a Llama's."""
    import json
    import os
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from .loading import check_folder

    with open(check_folder(src, what="Llama"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{src!r} holds a {model_type!r} model (config.json model_type), not a Llama")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"{dst!r} is a file, not a folder")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("the output folder must not be the Llama's folder")
    llama_model_config(LlamaConfig.from_pretrained(src), **nsa_overrides)  # its errors before the weights load
    llama = LlamaForCausalLM.from_pretrained(src)
    model = convert_llama(llama, gate_init=gate_init, **nsa_overrides)
    model.save_pretrained(dst)
    for name in sorted(os.listdir(src)):
        if name.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges.")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return model
