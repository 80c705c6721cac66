"""Bad input to the ops names the argument that is wrong."""

import pytest
import torch

from nsa import nsa_func
from nsa.geometry import num_cmp_blocks

GEO = dict(cmp_block=32, cmp_stride=16, sel_block=64, sel_count=3, window=32, backend="torch")


def inputs(T=128, B=1, HQ=4, H=2, D=16):
    tc = num_cmp_blocks(T, GEO["cmp_block"], GEO["cmp_stride"])
    kv = [torch.randn(B, n, H, D) for n in (tc, tc, T, T, T, T)]
    return [torch.randn(B, T, HQ, D), *kv, torch.rand(B, T, HQ, 3)]


def test_wrong_T_in_q_is_reported_for_q():
    """Found: a q with another T than the keys was reported as a k_cmp shape error (the Tc that
    q's T implies did not match k_cmp's)."""
    q, *rest = inputs()
    with pytest.raises(ValueError, match=r"^q has T=100 rows but k_slc, v_slc, k_win and v_win have 128"):
        nsa_func(q[:, :100], *rest, **GEO)


def test_wrong_Tc_in_k_cmp_is_reported_for_k_cmp():
    """With q's T the same as the other keys', a k_cmp of the wrong length is k_cmp's error."""
    q, k_cmp, *rest = inputs()
    with pytest.raises(ValueError, match=r"^k_cmp must have shape \[B, Tc, H, Dk\] = \[1, 7, 2, 16\]"):
        nsa_func(q, k_cmp[:, :5], *rest, **GEO)
