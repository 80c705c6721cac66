"""Selection-locality statistics and the realistic benchmark inputs (nsa.apps.bench_inputs)."""

import pytest
import torch

from nsa.apps import bench_inputs as BI
from nsa.reference import select_blocks_ref

# a hand-made selection: l' = 4, n = 3, one KV head, positions 8..11 (start=8): blocks of
# position t are block 0 (forced), t // 4 (forced) and one free pick
IDX = torch.tensor([[[[0, 1, 2]], [[0, 1, 2]], [[0, 1, 2]], [[0, 2, 1]]]])  # [1, 4, 1, 3]
# t = 8..11 -> cur = 2: forced are 0, 2 and 1 (cur - 1): pick 1 is forced too
IDX2 = torch.tensor([[[[0, 5, 6]], [[0, 5, 6]], [[0, 4, 6]], [[0, 3, 7]]]])  # t = 24..27, cur = 6


def test_overlap_of_a_hand_made_selection():
    # offset 1: (8,9) share 3/3, (9,10) 3/3, (10,11) 3/3 as sets
    assert BI.neighbour_overlap(IDX, 1, sel_block=4, start=8, q_offset=8).tolist() == [1.0]
    # IDX2 at t = 24..27: (24,25) 3/3, (25,26) {0,6} of {0,5,6} = 2/3, (26,27) {0} = 1/3 -> 2/3
    ov = BI.neighbour_overlap(IDX2, 1, sel_block=4, q_offset=24)
    assert ov.tolist() == pytest.approx([2 / 3])
    # offset 2: (24,26) 2/3, (25,27) 1/3
    assert BI.neighbour_overlap(IDX2, 2, sel_block=4, q_offset=24).tolist() == pytest.approx([0.5])
    # free picks of 24..26 (forced 0, 6, 5): 24: none free... 5 is cur - 1 -> forced; free: none
    # so with cur = 6 the free picks are 4 (t = 26) and 3, 7 (t = 27): offset 1 counts only
    # t = 26 (t + 1 = 27 lacks 4): 0 / 1
    assert BI.neighbour_overlap(IDX2, 1, sel_block=4, free_only=True, q_offset=24).tolist() == [0.0]
    # start leaves positions out: only the pair (26, 27)
    assert BI.neighbour_overlap(IDX2, 1, sel_block=4, start=26, q_offset=24).tolist() == pytest.approx([1 / 3])


def test_forced_share_and_distances():
    # IDX2: 12 picks, forced: t=24: 0,5,6; 25: 0,5,6; 26: 0,6; 27: 0 -> 9 of 12; 7 is not forced
    # at t = 27 (cur = 6): free are 4 (t = 26), 3 and 7 (t = 27)
    assert BI.forced_fraction(IDX2, sel_block=4, q_offset=24).tolist() == [0.75]
    d = BI.free_pick_distances(IDX2, sel_block=4, q_offset=24)[0]
    assert sorted(d.tolist()) == [-1, 2, 3]
    h = BI.distance_histogram(torch.tensor([2, 3, 5, 100, 5000]))
    assert h["2-3"] == 0.4 and h["4-7"] == 0.2 and h["64-127"] == 0.2 and h["4096+"] == 0.2


def test_padding_is_not_counted():
    idx = torch.tensor([[[[0, -1]], [[0, -1]]]])  # [1, 2, 1, 2]
    assert BI.neighbour_overlap(idx, 1, sel_block=4, start=0).tolist() == [1.0]
    with pytest.raises(ValueError, match="k must be"):
        BI.neighbour_overlap(idx, 0, sel_block=4)


SMALL = dict(HQ=4, H=2, Dk=32, Dv=32, l=8, d=4, lp=8, n=8, w=16, shared=False)


def test_realistic_inputs_match_their_target_overlap():
    T, target = 2048, {1: 0.6, 64: 0.3}
    # calibrated on probe windows of the same seed's paths (other noise), measured on all rows
    x, fit = BI.realistic_inputs(T, SMALL, "cpu", seed=2, target=target)
    q, kc = x[0], x[1]
    assert q.shape == (1, T, 4, 32) and kc.shape == (1, (T - 8) // 4 + 1, 2, 32)
    idx = select_blocks_ref(q.float(), kc.float(), cmp_block=8, cmp_stride=4, sel_block=8, sel_count=8)
    for k, want in target.items():  # all positions, bf16 inputs
        got = float(BI.neighbour_overlap(idx, k, sel_block=8, free_only=True).mean())
        assert got == pytest.approx(want, abs=0.05), (k, got, fit)
    # random inputs are far less local
    qr, kr = torch.randn_like(q.float()), torch.randn_like(kc.float())
    idr = select_blocks_ref(qr, kr, cmp_block=8, cmp_stride=4, sel_block=8, sel_count=8)
    assert float(BI.neighbour_overlap(idr, 1, sel_block=8, free_only=True).mean()) < 0.3


def test_synthesis_is_deterministic_per_seed():
    a = BI.synth_qk(512, 4, 2, 32, 8, 4, drift=64, noise=0.5, seed=3)
    b = BI.synth_qk(512, 4, 2, 32, 8, 4, drift=64, noise=0.5, seed=3)
    c = BI.synth_qk(512, 4, 2, 32, 8, 4, drift=64, noise=0.5, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    # the path at a position does not depend on which positions are built (calibration probes)
    part = BI.synth_qk(512, 4, 2, 32, 8, 4, drift=64, noise=0.0, seed=3, positions=torch.arange(256, 512))
    full = BI.synth_qk(512, 4, 2, 32, 8, 4, drift=64, noise=0.0, seed=3)
    assert torch.equal(part[0][0], full[0][0, 256:]) and torch.equal(part[1], full[1])


def test_tile_distinct_counts_each_valid_block_once():
    """benchmarks/slc_tile_distinct.py's statistic: distinct blocks per tile of bt positions and
    one group, -1 left out, against a count by Python sets."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "slc_tile_distinct.py")
    spec = importlib.util.spec_from_file_location("slc_tile_distinct", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tile_distinct = mod.tile_distinct

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 9, (1, 8, 2, 3), generator=g)  # 8 positions, 2 groups, n = 3
    want = [len({b for t in range(t0, t0 + 4) for b in idx[0, t, h].tolist() if b >= 0})
            for t0 in (0, 4) for h in (0, 1)]
    assert tile_distinct(idx, 4).tolist() == want
    assert tile_distinct(torch.full((1, 4, 1, 2), -1), 4).tolist() == [0]
