"""nsa in Hugging Face transformers (the optional extra ``nsa[hf]``, transformers 5.x).

``import nsa.hf`` registers ``model_type = "nsa"`` with ``AutoConfig`` and
``AutoModelForCausalLM``; then::

    AutoConfig.for_model("nsa", preset="tiny", window=64)   # any preset, any field
    AutoModelForCausalLM.from_pretrained(folder)            # a folder save_pretrained wrote

Public API:
    NSALMConfig     - the PretrainedConfig (nsa's ModelConfig fields)
    NSAForCausalLM  - PreTrainedModel + GenerationMixin around nsa.model.NSAModel
    NSALMCache      - the transformers Cache holding nsa's KV caches (what generate uses)
    convert_llama   - a LlamaForCausalLM to an NSA model whose branches start from its weights
    load_folder     - an nsa.model.NSAModel from a transformers folder (the CLI's loader)

The core package (``import nsa``) never imports transformers.
"""

from __future__ import annotations

try:
    import transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nsa.hf needs Hugging Face transformers 5.x: pip install 'nsa[hf]'") from e

if int(transformers.__version__.split(".")[0]) != 5:  # pragma: no cover
    raise ImportError(f"nsa.hf needs transformers 5.x, found {transformers.__version__}: pip install 'nsa[hf]'")

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import NSALMConfig
from .convert import convert_llama
from .loading import load_folder
from .modeling import NSAForCausalLM, NSALMCache

AutoConfig.register(NSALMConfig.model_type, NSALMConfig, exist_ok=True)
AutoModelForCausalLM.register(NSALMConfig, NSAForCausalLM, exist_ok=True)

__all__ = ["NSAForCausalLM", "NSALMCache", "NSALMConfig", "convert_llama", "load_folder"]
