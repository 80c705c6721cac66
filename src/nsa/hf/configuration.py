"""``NSALMConfig``: nsa's :class:`nsa.model.ModelConfig` as a transformers ``PretrainedConfig``.

The config holds the ModelConfig's fields as attributes (``attn`` as a nested dict, what
``config.json`` stores) and builds the ModelConfig back with :meth:`NSALMConfig.to_model_config`:
one set of fields and one validation, nsa's own. The usual transformers names read them:
``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (read-only),
``num_hidden_layers``, ``max_position_embeddings`` and ``tie_word_embeddings`` (aliases of
``n_layers``, ``max_seq_len`` and ``tie_embeddings``).
"""

from __future__ import annotations

from dataclasses import asdict, fields

from transformers import PretrainedConfig

from ..config import NSAConfig
from ..model import PRESETS, ModelConfig

_MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name != "attn")
_ATTN_FIELDS = tuple(f.name for f in fields(NSAConfig))
# transformers' names of attention fields, taken as arguments (and read as properties)
_HF_ATTN_NAMES = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads"}


class NSALMConfig(PretrainedConfig):
    """Configuration of :class:`nsa.hf.NSAForCausalLM` (``model_type = "nsa"``).

    Args:
        preset: start from ``nsa.model.PRESETS[preset]`` ("tiny", "small", "base") instead of a
            default ModelConfig.
        **kwargs: ModelConfig fields (``n_layers=4``), the attention layer's NSAConfig fields
            flat (``window=64``), dotted (``**{"attn.window": 64}``) or as a dict
            (``attn={"window": 64}``, what config.json holds), the aliases
            ``num_hidden_layers``, ``max_position_embeddings`` and ``tie_word_embeddings``, and
            any ``PretrainedConfig`` argument (``use_cache``, token ids, ``dtype``, ...).

    ``AutoConfig.for_model("nsa", preset="tiny", window=64)`` builds one after ``import nsa.hf``.
    Invalid values raise nsa's ``ValueError`` naming the field.
    """

    model_type = "nsa"
    attribute_map = {"num_hidden_layers": "n_layers", "max_position_embeddings": "max_seq_len",
                     "tie_word_embeddings": "tie_embeddings"}
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, preset: str | None = None, **kwargs):
        changes = {}
        attn = kwargs.pop("attn", None) or {}
        if not isinstance(attn, dict):
            raise TypeError(f"NSALMConfig(attn=...) must be a dict of NSAConfig fields, got {type(attn).__name__}")
        changes.update({f"attn.{k}": v for k, v in attn.items()})
        for alias, name in (*self.attribute_map.items(), *_HF_ATTN_NAMES.items()):
            if alias in kwargs:
                changes[name] = kwargs.pop(alias)
        for k in list(kwargs):
            if k in _MODEL_FIELDS or k in _ATTN_FIELDS or (k.startswith("attn.") and k[5:] in _ATTN_FIELDS):
                changes[k] = kwargs.pop(k)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[preset] if preset is not None else ModelConfig()
        self._set_fields(base.replace(**changes))
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' ``from_dict``; a config of another ``model_type`` raises ValueError
        (transformers would only warn and build a wrong model)."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"the config's model_type is {model_type!r}, not {cls.model_type!r}: not an nsa "
                             "model (a Llama converts with nsa.hf.convert_llama or nsa convert)")
        return super().from_dict(config_dict, **kwargs)

    def _set_fields(self, mc: ModelConfig) -> None:
        for name in _MODEL_FIELDS:
            setattr(self, name, getattr(mc, name))
        self.attn = asdict(mc.attn)

    def to_model_config(self, **overrides) -> ModelConfig:
        """The :class:`nsa.model.ModelConfig` these fields describe, with ``overrides`` applied
        (:meth:`ModelConfig.replace`: e.g. ``backend="torch"``)."""
        d = {name: getattr(self, name) for name in _MODEL_FIELDS}
        d["attn"] = dict(self.attn)
        return ModelConfig.from_dict(d).replace(**overrides)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "NSALMConfig":
        """An NSALMConfig of an nsa ModelConfig (``kwargs``: PretrainedConfig arguments)."""
        d = config.to_dict()
        return cls(**d, **kwargs)

    # the usual transformers names, read from the attention config
    @property
    def hidden_size(self) -> int:
        return self.attn["d_model"]

    @property
    def num_attention_heads(self) -> int:
        return self.attn["n_heads"]

    @property
    def num_key_value_heads(self) -> int:
        return self.attn["n_kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.attn["head_dim"]
