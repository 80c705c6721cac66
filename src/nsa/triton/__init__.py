"""Triton kernels of NSA (forward); ``import nsa.triton`` raises ImportError without triton.

Public functions, each with the signature of its reference in :mod:`nsa.reference`:
:func:`compressed_attention_triton`, :func:`select_blocks_triton`,
:func:`selected_attention_triton`, :func:`sliding_window_triton`, :func:`nsa_triton`,
:func:`nsa_decode_triton` (reference :func:`nsa.reference.nsa_decode_ref`).
They run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (for debugging and CI).
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the install
    raise ImportError(f"nsa.triton needs the triton package ({e})") from e

from .compressed import compressed_attention_triton
from .decode import nsa_decode_triton
from .nsa import nsa_triton
from .select import select_blocks_triton
from .selected import selected_attention_triton
from .window import sliding_window_triton

__all__ = ["compressed_attention_triton", "nsa_decode_triton", "select_blocks_triton", "selected_attention_triton",
           "sliding_window_triton", "nsa_triton"]
