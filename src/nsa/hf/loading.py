"""Reading transformers folders: the checks with clear errors, and :func:`load_folder`, the
command line's loader (``nsa generate`` and ``nsa needle`` take a save_pretrained folder)."""

from __future__ import annotations

import json
import os

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_transformers_folder(path: str) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (what save_pretrained writes)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def check_folder(path: str, what: str = "transformers") -> str:
    """The path of ``path``'s config.json; ValueError when ``path`` is not a folder, has no
    config.json or no safetensors weights (model.safetensors or its sharded index)."""
    if not os.path.exists(path):
        raise ValueError(f"{path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a folder (a {what} model is a folder with config.json and weights)")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"{path!r} has no config.json: not a {what} model folder")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        found = ", ".join(sorted(os.listdir(path)))
        raise ValueError(f"{path!r} has no weights: it needs model.safetensors (or a sharded "
                         f"model.safetensors.index.json); it holds {found}")
    return cfg


def load_folder(path: str, device="cpu", **overrides):
    """The :class:`nsa.model.NSAModel` (in eval mode) of a transformers folder of an nsa model
    (``NSAForCausalLM.save_pretrained``); ``overrides`` replace config fields (e.g.
    ``backend``; :meth:`nsa.model.ModelConfig.replace`). ValueError names what is wrong
    with a folder that is not one (no config.json, no weights, another model_type)."""
    from .configuration import NSALMConfig
    from .modeling import NSAForCausalLM

    with open(check_folder(path), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != NSALMConfig.model_type:
        hint = " (convert it first: nsa convert LLAMA_FOLDER OUT_FOLDER)" if model_type == "llama" else ""
        raise ValueError(f"{path!r} holds a {model_type!r} model (config.json model_type), not an nsa "
                         f"one{hint}")
    config = NSALMConfig.from_pretrained(path)
    if overrides:
        config._set_fields(config.to_model_config(**overrides))
    model = NSAForCausalLM.from_pretrained(path, config=config)
    return model.model.to(device).eval()
