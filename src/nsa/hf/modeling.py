"""``NSAForCausalLM``: nsa's :class:`nsa.model.NSAModel` as a transformers causal LM.

The model is nsa's own (``NSAForCausalLM.model`` is an ``NSAModel``; its state dict, prefixed
``model.``, is what ``save_pretrained`` writes), so the logits, the loss and the KV cache are
those of ``nsa.model``; this module adapts the calling conventions:

* ``forward(input_ids, attention_mask=None, cache=None, labels=None, use_cache=None,
  logits_to_keep=0)`` returns a ``CausalLMOutputWithPast``; with ``labels`` its ``loss`` is
  transformers' causal LM loss (labels shifted inside, -100 ignored), what ``Trainer`` reads.
* :class:`NSALMCache` is a transformers ``Cache`` holding nsa's preallocated per-layer caches
  (:class:`nsa.NSACache`, or the dense baselines' ``KVCache``); ``generate`` makes one sized for
  the prompt plus ``max_new_tokens``, and a cache used past its size grows (doubling).
* Padding: the model has no attention mask, so ``attention_mask`` may only mark padding at the
  end of a sequence (right padding, harmless for a causal model: no real token sees it) and
  must be all ones once a cache holds tokens. Left padding raises a ``ValueError``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import ModelCache, NSAModel
from .configuration import NSALMConfig

# transformers renamed ``past_key_values`` to ``cache`` during 5.x: use the name this one has
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------- cache
class _LayerView(CacheLayerMixin):
    """One decoder layer's entry in :class:`NSALMCache` (its buffers live in the parent's
    ``ModelCache``; nsa's layers write them, so :meth:`update` is not used)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, parent: "NSALMCache", index: int):
        super().__init__()
        self.parent, self.index = parent, index

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("NSALMCache is written by nsa's layers, not through Cache.update")

    def get_seq_length(self) -> int:
        return self.parent.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx) -> None:
        pass


class NSALMCache(Cache):
    """nsa's KV cache behind transformers' ``Cache`` interface.

    Holds a :class:`nsa.model.ModelCache` (``state``; None until the first forward): one
    preallocated :class:`nsa.NSACache` per layer (``KVCache`` for the dense baselines) and the
    last token seen (for the token shift). It is allocated at the first forward for that call's
    batch size, dtype and device, ``max_seq_len`` positions long (at least the tokens of that
    call), and grows to twice its size, copying what it holds, when a call needs more room.

    Args:
        config: the model's :class:`NSALMConfig` (for the number of layers).
        max_seq_len: positions to allocate at the first forward (``generate`` passes the prompt
            length plus ``max_new_tokens``); None: the first call's length.

    ``generate`` makes one by itself; pass one (``cache=NSALMCache(model.config)``) to keep it
    after the call. Beam search reorders it (:meth:`reorder_cache`); it cannot be cropped
    (speculative decoding is not supported).
    """

    def __init__(self, config: NSALMConfig, max_seq_len: int | None = None):
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len <= 0):
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        super().__init__(layers=[])
        self.layers = [_LayerView(self, i) for i in range(config.n_layers)]
        self.max_seq_len = max_seq_len
        self.state: ModelCache | None = None

    def __repr__(self) -> str:
        held = "empty" if self.state is None else f"{self.get_seq_length()} of {self.capacity} positions"
        return f"NSALMCache({len(self.layers)} layers, {held})"

    # ------------------------------------------------------------------ what transformers reads
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows

    @property
    def capacity(self) -> int:
        """Positions the buffers hold now (0 before the first forward)."""
        return 0 if self.state is None else self.state.layers[0].max_seq_len

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.last.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        """Forget every held position (the buffers stay allocated)."""
        if self.state is not None:
            self.state.length = 0
            for layer in self.state.layers:
                layer.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("NSALMCache cannot be cropped (nsa's compressed tokens are not undone)")

    # ------------------------------------------------------------------ batch reordering
    def _map(self, fn) -> None:
        """Apply ``fn`` to every tensor of the held state (all have the batch first)."""
        if self.state is None:
            return
        for layer in self.state.layers:
            for f in dataclasses.fields(layer):
                t = getattr(layer, f.name)
                if isinstance(t, torch.Tensor):
                    setattr(layer, f.name, fn(t))
        self.state.last = fn(self.state.last)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (beam search)."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    # ------------------------------------------------------------------ allocation
    def prepare(self, model: NSAModel, batch_size: int, new_tokens: int) -> ModelCache:
        """The ``ModelCache`` to run ``new_tokens`` more tokens of ``batch_size`` sequences
        through ``model``: allocated on the first call, grown when it is too short."""
        if self.state is not None and self.state.last.shape[0] != batch_size:
            raise ValueError(f"the cache holds {self.state.last.shape[0]} sequences, the input has "
                             f"{batch_size}")
        need = self.get_seq_length() + new_tokens
        if self.state is None:
            self.state = model.new_cache(batch_size, max(need, self.max_seq_len or 0))
        elif need > self.capacity:
            self._grow(model, max(need, 2 * self.capacity))
        return self.state

    def _grow(self, model: NSAModel, size: int) -> None:
        old = self.state
        ref = old.layers[0]
        dt = next(t for t in (getattr(ref, f.name) for f in dataclasses.fields(ref)) if isinstance(t, torch.Tensor))
        new = model.new_cache(old.last.shape[0], size, dtype=dt.dtype, device=dt.device)
        # every buffer is [B, N, ...] with its positions (or compressed tokens, or a ring and a
        # tail of fixed size) along N from 0: the held ones are a prefix of the larger buffer
        for a, b in zip(old.layers, new.layers):
            for f in dataclasses.fields(a):
                t = getattr(a, f.name)
                if isinstance(t, torch.Tensor):
                    getattr(b, f.name)[:, :t.shape[1]].copy_(t)
            b.length = a.length
        new.last.copy_(old.last)
        new.length = old.length
        self.state = new


# --------------------------------------------------------------------------- model
class NSAPreTrainedModel(PreTrainedModel):
    """Base of the nsa models in transformers: config class, weight init (nsa's own)."""

    config_class = NSALMConfig
    config: NSALMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        # nsa's init (NSAModel._init_weights: N(0, init_std), residual projections scaled by depth;
        # the gate and the compressor keep the layer's init, which makes phi "mlp" start as "mean")
        if isinstance(module, NSAModel):
            module._init_weights()


class NSAForCausalLM(NSAPreTrainedModel, GenerationMixin):
    """nsa's decoder (:class:`nsa.model.NSAModel`, attribute ``model``) as a transformers causal LM.

    ``NSAForCausalLM(config)`` builds a new model with nsa's initialisation;
    :meth:`from_nsa` wraps an existing ``NSAModel`` (its weights shared, not copied);
    :func:`nsa.hf.convert_llama` makes one from a ``LlamaForCausalLM``. ``save_pretrained`` /
    ``from_pretrained`` write and read ``config.json`` and ``model.safetensors``;
    ``AutoModelForCausalLM`` finds the class after ``import nsa.hf``.
    """

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # when tie_embeddings

    def __init__(self, config: NSALMConfig, model: NSAModel | None = None):
        super().__init__(config)
        self.model = model if model is not None else NSAModel(config.to_model_config())
        self.post_init()

    @classmethod
    def from_nsa(cls, model: NSAModel, **config_kwargs) -> "NSAForCausalLM":
        """Wrap an nsa ``NSAModel`` (sharing its parameters); ``config_kwargs`` go to
        :class:`NSALMConfig` (e.g. ``eos_token_id``)."""
        if not isinstance(model, NSAModel):
            raise TypeError(f"model must be an nsa.model.NSAModel, got {type(model).__name__}")
        config = NSALMConfig.from_model_config(model.config, **config_kwargs)
        with torch.device("meta"):  # the config's own NSAModel is not materialised: ``model`` replaces it
            out = cls(config)
        out.model = model
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; a checkpoint whose weights do not match the
        config (missing or unexpected tensors) raises a ``ValueError`` naming them instead of
        leaving freshly initialised weights in the model."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(bad.values()):
            raise ValueError(f"{pretrained_model_name_or_path!r}: the weights do not match its config.json: "
                             + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items() if v))
        return (model, info) if want_info else model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: the model uses NSALMCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate's hook for the cache: an :class:`NSALMCache` sized for the whole output
        (the prompt plus ``max_new_tokens``), or the caller's, which must be one."""
        user = model_kwargs.get(_CACHE_FIELD)
        if user is not None:
            if not isinstance(user, NSALMCache):
                raise TypeError(f"{_CACHE_FIELD} must be an nsa.hf.NSALMCache (NSALMCache(model.config)), "
                                f"got {type(user).__name__}")
            user._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        model_kwargs[_CACHE_FIELD] = NSALMCache(self.config, getattr(generation_config, "max_length", None))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: NSALMCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[B, T, vocab]`` (``logits_to_keep=k > 0``: of the last k positions only) of
        ``input_ids`` ``[B, T]``, continuing ``cache`` when given.

        Args:
            input_ids: token ids ``[B, T]`` (``inputs_embeds`` is not supported: the token shift
                reads the previous token's embedding).
            attention_mask: ``[B, T]`` (or the whole sequence's, cached part included) ones,
                followed by zeros (right padding) when no cache is used; left padding raises.
            cache: an :class:`NSALMCache` to continue (``past_key_values`` is taken too).
            labels: ``[B, T]`` targets for the loss, shifted inside (position t predicts
                ``labels[:, t + 1]``), -100 ignored; ``num_items_in_batch`` (from ``Trainer``)
                normalises the sum over the global batch.
            use_cache: return the cache (a new one when none is given); default
                ``config.use_cache`` outside training, or whether a cache was passed.
            logits_to_keep: an int k (> 0: the last k positions) or a tensor of positions.
            output_hidden_states: also return the final norm's output (``hidden_states``, a
                one-element tuple).
        """
        if inputs_embeds is not None:
            raise ValueError("NSAForCausalLM takes input_ids, not inputs_embeds (the token shift reads "
                             "the previous token's embedding)")
        if input_ids is None:
            raise ValueError("NSAForCausalLM needs input_ids [B, T]")
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        if use_cache is None:
            use_cache = cache is not None or (bool(getattr(self.config, "use_cache", True)) and not self.training)
        if not use_cache:
            cache = None
        elif cache is None:
            cache = NSALMCache(self.config)
        elif not isinstance(cache, NSALMCache):
            raise TypeError(f"cache must be an nsa.hf.NSALMCache (NSALMCache(model.config)), got "
                            f"{type(cache).__name__}")
        past = 0 if cache is None else cache.get_seq_length()
        _check_mask(attention_mask, input_ids, past)
        _check_positions(kwargs.pop("position_ids", None), input_ids, past)
        B, T = input_ids.shape
        state = None if cache is None else cache.prepare(self.model, B, T)
        h = self.model.features(input_ids, cache=state)  # [B, T, d_model]
        if isinstance(logits_to_keep, int):
            kept = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            kept = h[:, logits_to_keep]
        logits = self.model.lm_head(kept)
        loss = None
        if labels is not None:
            if kept.shape[1] != T:
                raise ValueError("labels need the logits of every position: logits_to_keep must be 0")
            extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **extra)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=(h,) if output_hidden_states else None,
                                     **{_CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()


def _check_mask(mask, input_ids: torch.Tensor, past: int) -> None:
    """attention_mask: ones, then (without a cache) zeros at the end of a row; nothing else."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != input_ids.shape[0] \
            or mask.shape[1] not in (input_ids.shape[1], past + input_ids.shape[1]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be [B, T] = {list(input_ids.shape)} (or [B, cached + T]), got {shape}")
    m = mask.bool()
    if bool(m.all()):
        return
    if past == 0 and not bool((m[:, 1:] & ~m[:, :-1]).any()):
        return  # right padding: no real token after a pad
    raise ValueError("attention_mask has padding before or between tokens (left padding), or padding "
                     "with a cache: NSAForCausalLM attends by position and has no padding mask; pad on "
                     "the right (training, with labels -100 there) or batch sequences of one length")


def _check_positions(position_ids, input_ids: torch.Tensor, past: int) -> None:
    """position_ids, when given, must be the positions the model uses: past, past + 1, ..."""
    if position_ids is None:
        return
    T = input_ids.shape[1]
    want = torch.arange(past, past + T, device=position_ids.device)
    if position_ids.shape[-1] != T or not bool((position_ids.reshape(-1, T) == want).all()):
        raise ValueError(f"position_ids must be {past}..{past + T - 1} on every row (the positions "
                         "after the cache): NSAForCausalLM takes no other positions")
