"""Inputs of ``nsa bench prefill --inputs realistic``: queries and compressed keys whose block
selection has the locality a trained model's has, and the statistics that measure it.

Locality statistics of a selection ``idx`` (int64 ``[B, T, H, n]``, ascending, -1 padded, as
:func:`nsa.select_blocks` returns it):

* :func:`neighbour_overlap`: for an offset k, the mean over positions t of the fraction of the
  blocks t selects that t + k selects too (per KV head); ``free_only`` counts only the blocks t
  picked by score (not its forced blocks 0, t // l' and t // l' - 1).
* :func:`forced_fraction`: the share of the selected blocks that are forced blocks.
* :func:`free_pick_distances`: how far back (in blocks, t // l' - j) each free pick lies.

Positions t < n * l' are left out: there every eligible block is selected, nothing is chosen.

Synthesis (:func:`realistic_inputs`, docs/benchmarks.md): the compressed keys are i.i.d. normal;
each query head follows a smooth random path in direction space (normal anchor vectors every
``drift`` positions, interpolated with a cosine ramp) mixed with independent per-position noise
of weight ``sin(theta)``. The path makes a query's scores change slowly with t, so neighbours
pick the same blocks; the two knobs are fitted (:func:`calibrate`) on the last queries of the
sequence so that the free-pick overlap at offsets 1 and 64 matches a target, by default the one
measured on the committed trained model (:data:`TRAINED_FREE_OVERLAP`).
"""

from __future__ import annotations

import math

import torch

# Free-pick neighbour overlap of the committed trained model (tests/data/
# needle_gpu_h8kv1_s3_model.safetensors), mean over layers, groups, inputs and contexts:
# benchmarks/selection_locality.py, benchmarks/results/selection_locality_cpu.json.
TRAINED_FREE_OVERLAP = {1: 0.540, 4: 0.460, 16: 0.414, 64: 0.388}
# the same over all n blocks (forced ones included, 3 of n = 8 there)
TRAINED_OVERLAP = {1: 0.706, 4: 0.636, 16: 0.530, 64: 0.408}

OFFSETS = (1, 4, 16, 64)


def _forced(idx: torch.Tensor, sel_block: int, t0: int) -> torch.Tensor:
    """Whether each entry of ``idx [B, C, H, n]`` (positions t0..t0+C-1) is a forced block."""
    t = torch.arange(t0, t0 + idx.shape[1], device=idx.device)[None, :, None, None]
    cur = t // sel_block
    return (idx == 0) | (idx == cur) | (idx == cur - 1)


def _start(idx: torch.Tensor, sel_block: int, start) -> int:
    return idx.shape[-1] * sel_block if start is None else int(start)


def neighbour_overlap(idx: torch.Tensor, k: int, *, sel_block: int, free_only: bool = False,
                      start: int | None = None, q_offset: int = 0, chunk: int = 4096) -> torch.Tensor:
    """float64 ``[H]``: mean over B and positions t (``start <= t``, ``t + k < T``) of
    |S(t) & S(t+k)| / |S(t)|, S(t) the valid blocks t selects (``free_only``: only its blocks
    that are not forced, counted whether or not t + k has them forced).

    ``idx`` int64 ``[B, T, H, n]`` (-1 padded) of queries at positions q_offset..q_offset+T-1;
    ``start`` an absolute position, default n * sel_block (before it nothing is chosen).
    """
    if idx.dim() != 4:
        raise ValueError(f"idx must have shape [B, T, H, n], got {tuple(idx.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    B, T, H, n = idx.shape
    s = max(0, _start(idx, sel_block, start) - q_offset)
    num = torch.zeros(H, dtype=torch.float64, device=idx.device)
    den = torch.zeros(H, dtype=torch.float64, device=idx.device)
    for c0 in range(s, T - k, chunk):
        c1 = min(T - k, c0 + chunk)
        a, b = idx[:, c0:c1], idx[:, c0 + k:c1 + k]  # [B, C, H, n]
        keep = a >= 0
        if free_only:
            keep &= ~_forced(a, sel_block, q_offset + c0)
        hit = (a[..., :, None] == b[..., None, :]).any(-1) & keep
        num += hit.sum((0, 1, 3)).double()
        den += keep.sum((0, 1, 3)).double()
    return num / den.clamp_min(1)


def forced_fraction(idx: torch.Tensor, *, sel_block: int, start: int | None = None,
                    q_offset: int = 0) -> torch.Tensor:
    """float64 ``[H]``: the share of the valid selected blocks (positions t >= start) that
    are forced (block 0, t // l', t // l' - 1)."""
    s = max(0, _start(idx, sel_block, start) - q_offset)
    a = idx[:, s:]
    f = _forced(a, sel_block, q_offset + s) & (a >= 0)
    return f.sum((0, 1, 3)).double() / (a >= 0).sum((0, 1, 3)).double().clamp_min(1)


def free_pick_distances(idx: torch.Tensor, *, sel_block: int, start: int | None = None,
                        q_offset: int = 0) -> list[torch.Tensor]:
    """Per KV head, int64 distances t // l' - j (in blocks, >= 2) of the free picks j of the
    positions t >= start."""
    s = max(0, _start(idx, sel_block, start) - q_offset)
    a = idx[:, s:]
    t = torch.arange(q_offset + s, q_offset + idx.shape[1], device=idx.device)[None, :, None, None]
    free = (a >= 0) & ~_forced(a, sel_block, q_offset + s)
    dist = (t // sel_block - a).expand_as(a)
    return [dist[:, :, g][free[:, :, g]] for g in range(idx.shape[2])]


DISTANCE_BINS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def distance_histogram(dist: torch.Tensor, bins=DISTANCE_BINS) -> dict:
    """Share of distances (in blocks) in [bins[i], bins[i+1]) keyed "lo-hi" (last bin open)."""
    n = max(1, dist.numel())
    out = {}
    for i, lo in enumerate(bins):
        hi = bins[i + 1] if i + 1 < len(bins) else None
        m = (dist >= lo) if hi is None else (dist >= lo) & (dist < hi)
        out[f"{lo}-{hi - 1}" if hi else f"{lo}+"] = int(m.sum()) / n
    return out


# ------------------------------------------------------------------------------ synthesis
def _path(gen_seed: int, pos: torch.Tensor, heads: int, dim: int, drift: float, n_anchor: int,
          device) -> torch.Tensor:
    """fp32 ``[len(pos), heads, dim]``: a smooth random path at positions ``pos``: normal
    anchors every ``drift`` positions (``n_anchor`` of them, drawn in one call from
    ``gen_seed``, so a position's value does not depend on which positions are asked for),
    cosine-interpolated and rescaled to unit variance per coordinate."""
    g = torch.Generator(device=device).manual_seed(gen_seed)
    A = torch.randn(n_anchor, heads, dim, device=device, generator=g)
    x = pos.to(torch.float64) / drift
    m = x.floor().long().clamp_max(n_anchor - 2)
    a = (x - m).clamp(0, 1)
    w1 = ((1 - torch.cos(math.pi * a)) / 2).float()[:, None, None]
    w0 = 1 - w1
    return (w0 * A[m] + w1 * A[m + 1]) / torch.sqrt(w0 * w0 + w1 * w1)


def synth_qk(T: int, HQ: int, H: int, Dk: int, cmp_block: int, cmp_stride: int, *, drift: float,
             noise: float, seed: int = 0, key_noise: float = 0.8, gain: float = 0.35,
             positions: torch.Tensor | None = None, noise_seed: int = 0, device="cpu",
             dtype=torch.bfloat16):
    """(q ``[1, len(positions), HQ, Dk]``, k_cmp ``[1, Tc, H, Dk]``) of the realistic inputs.

    Every KV head g has a smooth random path P_g(t) (:func:`_path`, one anchor every ``drift``
    positions). Query head h of group g at position t is ``gain * (sqrt(1 - noise^2) P_g(t) +
    noise * e)``, compressed token i is ``sqrt(1 - key_noise^2) P_g(end_i) + key_noise * e'``
    (end_i its last key position, e, e' standard normal). A query scores highest the
    compressed tokens from where the path was near its own point, which moves slowly with t:
    neighbours pick the same blocks, recent blocks more often than far ones; ``noise`` makes
    each position's choice partly its own. ``positions`` (default all of 0..T-1) picks the
    query rows to build (calibration builds a few windows; ``noise_seed`` varies their noise).
    Deterministic per seed.
    """
    from ..geometry import cmp_block_end, num_cmp_blocks

    if not 0 <= noise < 1 or not 0 <= key_noise < 1:
        raise ValueError(f"noise and key_noise must be in [0, 1), got {noise}, {key_noise}")
    if drift <= 0:
        raise ValueError(f"drift must be > 0, got {drift}")
    device = torch.device(device)
    pos = torch.arange(T, device=device) if positions is None else positions.to(device)
    n_anchor = int(T // drift) + 2
    tc = num_cmp_blocks(T, cmp_block, cmp_stride)
    h = HQ // H
    ends = cmp_block_end(torch.arange(tc, device=device), cmp_block, cmp_stride)
    g = torch.Generator(device=device).manual_seed(seed * 1000003 + 1)
    kc = torch.empty(1, tc, H, Dk, device=device, dtype=dtype)
    q = torch.empty(1, len(pos), HQ, Dk, device=device, dtype=dtype)
    step = 8192
    for c0 in range(0, tc, step):  # chunks: 128k x 64 heads x 192 in fp32 is 6 GiB
        p = _path(seed, ends[c0:c0 + step], H, Dk, drift, n_anchor, device)
        e = torch.randn(p.shape, device=device, generator=g)
        kc[0, c0:c0 + step] = (math.sqrt(1 - key_noise ** 2) * p + key_noise * e).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed * 1000003 + 2 + 7 * noise_seed)
    for c0 in range(0, len(pos), step):
        # the noise of position t is drawn from its own chunk's generator state: build
        # all rows in one pass for the benchmark (positions=None)
        p = _path(seed, pos[c0:c0 + step], H, Dk, drift, n_anchor, device)  # [C, H, Dk]
        e = torch.randn(p.shape, device=device, generator=g)
        x = gain * (math.sqrt(1 - noise ** 2) * p + noise * e)  # one query per group and position
        q[0, c0:c0 + step] = x[:, :, None].expand(-1, -1, h, -1).reshape(-1, HQ, Dk).to(dtype)
    return q, kc


def probe_overlap(T: int, c: dict, *, drift: float, noise: float, seed: int = 0, probe: int = 1024,
                  windows: int = 8, offsets=(1, 64), device="cpu", **kw) -> dict:
    """Free-pick overlap (mean over KV heads and windows) at ``offsets`` of the realistic
    inputs' selection (reference select) for ``probe`` query positions of a sequence of T at
    geometry ``c`` (keys HQ, H, Dk, l, d, lp, n as in bench.CONFIGS): ``windows`` runs of
    consecutive positions, one centred in each of equal strata of [n * l', T).

    The probed query rows are not the benchmark's own (their noise comes from other generator
    states) but have its distribution: the statistic is the same."""
    from ..reference import select_blocks_ref

    w = max(2 * max(offsets), probe // windows)
    lo = min(c["n"] * c["lp"], max(0, T - w))
    # one window centred in each of ``windows`` equal strata of [lo, T): the overlap falls with
    # t (more competing blocks), so windows at both ends would overweight the start
    span = (T - lo) / windows
    starts = sorted({min(T - w, max(lo, int(lo + (i + 0.5) * span - w / 2))) for i in range(windows)})
    acc = {k: 0.0 for k in offsets}
    for i, s0 in enumerate(starts):
        pos = torch.arange(s0, min(T, s0 + w), device=device)
        q, kc = synth_qk(T, c["HQ"], c["H"], c["Dk"], c["l"], c["d"], drift=drift, noise=noise, seed=seed,
                         positions=pos, device=device, noise_seed=i, **kw)  # bf16, as the benchmark's
        idx = select_blocks_ref(q.float(), kc.float(), cmp_block=c["l"], cmp_stride=c["d"], sel_block=c["lp"],
                                sel_count=c["n"], q_offset=s0)
        for k in offsets:
            acc[k] += float(neighbour_overlap(idx, k, sel_block=c["lp"], free_only=True, q_offset=s0).mean())
    return {k: v / len(starts) for k, v in acc.items()}


def calibrate(T: int, c: dict, target: dict | None = None, *, seed: int = 0, probe: int = 1024,
              device="cpu", steps: tuple[int, int] = (6, 7)) -> dict:
    """(drift, noise) of :func:`synth_qk` whose free-pick overlap at offsets 1 and 64
    (:func:`probe_overlap`) matches ``target`` (default :data:`TRAINED_FREE_OVERLAP`), at
    sequence length T and geometry c.

    Nested bisection: the outer one on log(drift) for the ratio overlap(64) / overlap(1) (the
    path's drift sets how fast the choice decays), the inner one on the noise for overlap(1)
    (the per-position noise sets its level). ``steps`` = (outer, inner) bisection steps.
    Returns dict(drift, noise, target, probe overlap at 1 and 64)."""
    target = dict(TRAINED_FREE_OVERLAP if target is None else target)
    t1, t64 = float(target[1]), float(target[64])
    if not 0 < t64 <= t1 < 1:
        raise ValueError(f"target overlaps must satisfy 0 < overlap(64) <= overlap(1) < 1, got {target}")
    ov = lambda drift, noise: probe_overlap(T, c, drift=drift, noise=noise, seed=seed, probe=probe,  # noqa: E731
                                            device=device)

    def fit_noise(drift):
        lo, hi = 0.0, 0.99
        r = None
        for _ in range(steps[1]):
            mid = (lo + hi) / 2
            r = ov(drift, mid)
            lo, hi = (mid, hi) if r[1] > t1 else (lo, mid)
        noise = (lo + hi) / 2
        return noise, ov(drift, noise)

    lo, hi = math.log2(c["lp"] / 2), math.log2(max(T / 4, 4 * c["lp"]))  # drift between l'/2 and T/4
    best = None
    for _ in range(steps[0]):
        mid = (lo + hi) / 2
        noise, r = fit_noise(2 ** mid)
        ratio = r[64] / max(r[1], 1e-9)
        err = abs(r[1] - t1) + abs(r[64] - t64)
        if best is None or err < best[0]:
            best = (err, 2 ** mid, noise, r)
        lo, hi = (lo, mid) if ratio > t64 / t1 else (mid, hi)
    _, drift, noise, r = best
    return dict(drift=drift, noise=noise, target={1: t1, 64: t64}, probe_overlap=r)


def selection_stats(idx: torch.Tensor, sel_block: int, q_offset: int = 0) -> dict:
    """Overlaps (all n blocks and free picks, mean over KV heads) at :data:`OFFSETS`, the
    forced share and the median free-pick distance in blocks, of a selection ``idx``."""
    d = torch.cat(free_pick_distances(idx, sel_block=sel_block, q_offset=q_offset))
    return dict(overlap={k: float(neighbour_overlap(idx, k, sel_block=sel_block, q_offset=q_offset).mean())
                         for k in OFFSETS},
                free_overlap={k: float(neighbour_overlap(idx, k, sel_block=sel_block, free_only=True,
                                                         q_offset=q_offset).mean()) for k in OFFSETS},
                forced_fraction=float(forced_fraction(idx, sel_block=sel_block, q_offset=q_offset).mean()),
                free_distance_median_blocks=float(d.double().median()) if d.numel() else None,
                free_distance_blocks=distance_histogram(d))


def realistic_inputs(T: int, c: dict, device, *, seed: int | None = None, params: dict | None = None,
                     target: dict | None = None, probe: int = 1024):
    """(inputs, info): the benchmark's inputs (q, k_cmp, v_cmp, k, v, k_win, v_win, gates, bf16,
    as ``bench._inputs``) with q and k_cmp from :func:`synth_qk`, fitted by :func:`calibrate`
    to ``target`` (default :data:`TRAINED_FREE_OVERLAP`) on the same seed's paths, unless
    ``params`` (drift, noise) is given; v_cmp, the slc and window keys/values and the
    gates are normal / uniform as in the random mode. ``info``: the parameters and the fit."""
    seed = T if seed is None else seed
    info = dict(params) if params is not None else calibrate(T, c, target, seed=seed, probe=probe, device=device)
    q, kc = synth_qk(T, c["HQ"], c["H"], c["Dk"], c["l"], c["d"], drift=info["drift"], noise=info["noise"],
                     seed=seed, device=device)
    g = torch.Generator(device=device).manual_seed(seed * 1000003 + 3)
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, generator=g)  # noqa: E731
    k, v = mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"])
    kw, vw = (k, v) if c["shared"] else (mk(1, T, c["H"], c["Dk"]), mk(1, T, c["H"], c["Dv"]))
    vc = mk(1, kc.shape[1], c["H"], c["Dv"])
    gates = torch.rand(1, T, c["HQ"], 3, device=device, generator=g).to(torch.bfloat16)
    return (q, kc, vc, k, v, kw, vw, gates), info
