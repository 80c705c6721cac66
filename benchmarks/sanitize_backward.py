"""Forward + backward at an odd varlen shape (for compute-sanitizer memcheck / racecheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_backward.py [det|nodet] [--split] [--dense]
        [--packed] [--no-tma] [--chunks] [--forced] [--edges32]

det / nodet: only deterministic=True / False (default both); --split: the slc kernels' split
launch on (nsa.triton.selected.SPLIT, off by default): 16 heads a group here, so it applies;
--dense: two sequences as a batch (no cu_seqlens) with cmp through cuDNN
(nsa.triton.cmp_dense.ENABLED); --packed: the varlen batch with its sequences of 200+
positions through cuDNN (cmp_dense.dense_spans, MIN_LEN lowered); --no-tma: every kernel's key
tiles by pointer loads (band.TMA, select.TMA, backward.BAND_DQ_TMA and selected.TMA off; all on
by default); --chunks: the cmp dk/dv split into query chunks of 128 positions (its descriptor
tiles and masked edge tiles per chunk), which the GPU's sizing leaves off at this length;
--forced: the forced blocks in 8-position tiles (nsa.triton.selected.FORCED, off by default);
--edges32: the band dk/dv's masked edge tiles at 32 rows (nsa.triton.backward.EDGE_ROWS).
"""
import sys
import torch
from nsa import nsa_func
from nsa.reference import compress_mean
from nsa.triton import _common as C
from nsa.triton import backward, band, cmp_dense, select, selected

argv = [a for a in sys.argv[1:] if not a.startswith("--")]
selected.SPLIT = "--split" in sys.argv[1:]
packed = "--packed" in sys.argv[1:]
cmp_dense.ENABLED = dense = "--dense" in sys.argv[1:] or packed
if packed:
    cmp_dense.MIN_LEN = 200
if "--no-tma" in sys.argv[1:]:  # pointer loads everywhere
    band.TMA = select.TMA = backward.BAND_DQ_TMA = selected.TMA = False
selected.FORCED = "--forced" in sys.argv[1:]
backward.EDGE_ROWS = 32 if "--edges32" in sys.argv[1:] else None
if "--chunks" in sys.argv[1:]:
    backward._q_chunk = lambda q_chunk, n_kprog, t_max, BT, device: C.cdiv(128, BT) * BT
torch.manual_seed(0)
dev = "cuda"
cu = torch.tensor([0, 77, 300, 301, 1203], dtype=torch.int32, device=dev)
T, HQ, H, Dk, Dv, l, d, lp = 1203, 16, 1, 192, 128, 32, 16, 64
mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16)
q, k, v = mk(1, T, HQ, Dk), mk(1, T, H, Dk), mk(1, T, H, Dv)
bounds = cu.tolist()
kc = torch.cat([compress_mean(k[:, a:b], l, d) for a, b in zip(bounds[:-1], bounds[1:])], 1)
vc = torch.cat([compress_mean(v[:, a:b], l, d) for a, b in zip(bounds[:-1], bounds[1:])], 1)
g = torch.rand(1, T, HQ, 3, device=dev).to(torch.bfloat16)
if dense and not packed:  # positions 1 .. 1202 as a batch of two sequences of 601
    q, k, v, g = (x[:, 1:].reshape(2, 601, *x.shape[2:]) for x in (q, k, v, g))
    kc, vc = compress_mean(k, l, d), compress_mean(v, l, d)
    cu = None
leaves = [x.detach().clone().requires_grad_() for x in (q, kc, vc, k, v, k.clone(), v.clone(), g)]
for det in ([False, True] if not argv else [argv[0] == "det"]):
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, sel_count=5, window=100, cu_seqlens=cu, backend="triton")
    try:
        o = nsa_func(*leaves, deterministic=det, **kw)
    except TypeError:  # before the op takes deterministic=
        o = nsa_func(*leaves, **kw)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print("ok det", det, "split", selected.SPLIT, "dense", dense, "packed", packed, "tma", band.TMA,
          float(leaves[0].grad.float().norm()))
