"""nsa: Native Sparse Attention (Yuan et al., 2025, arXiv 2502.11089).

Public API:
    nsa_func, select_blocks  - the functional ops (backend="auto" | "torch" | "triton")
    nsa_decode               - one decode step of each sequence against its cache (same backends)
    varlen_tables, VarlenTables - packed sequences (cu_seqlens) prepared once, outside torch.compile
    NSAConfig, NSAAttention  - the layer and its configuration
    NSACache                 - the layer's preallocated KV cache
    PagedNSACache            - the layer's paged KV cache (sequences join and leave a running batch)
"""

from .cache import NSACache, PagedNSACache
from .config import NSAConfig
from .layer import NSAAttention
from . import geometry
from .ops import VarlenTables, nsa_decode, nsa_func, select_blocks, varlen_tables
from .geometry import num_cmp_blocks

__version__ = "0.1.0"

__all__ = ["NSAAttention", "NSACache", "NSAConfig", "PagedNSACache", "VarlenTables", "nsa_decode", "nsa_func", "num_cmp_blocks",
           "select_blocks", "varlen_tables", "__version__"]
