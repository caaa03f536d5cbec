"""danet_torch.head: official keys, the float64 reference, gamma == 0, odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet_torch import DANetHead, DualAttention
from parity_tests import reference as ref
from weights_convert.testing import randomize_
from parity_tests.tests.helpers import state_numpy, to_numpy
from parity_tests.tests.official_keys import head_keys
from weights_convert.tolerances import compare, tolerance


def test_head_state_dict_is_upstreams():
    head = DANetHead(2048, 19)
    got = [(k, tuple(v.shape)) for k, v in head.state_dict().items()]
    assert sorted(got) == sorted(head_keys(2048, 19))
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 23_954_619


@pytest.mark.parametrize("hw", [(7, 9), (12, 12)])
def test_head_matches_reference(hw):
    head = randomize_(DANetHead(64, 5), seed=1).eval()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 64, *hw))).float()
    with torch.no_grad():
        outputs = head(x)
    expected = ref.danet_head(to_numpy(x), state_numpy(head))
    for name, got, exp in zip(("fused", "pam", "cam"), outputs, expected):
        result = compare(f"DANetHead {name} {hw}", to_numpy(got), exp, tolerance("float32"))
        assert result.passed, result.message()


@pytest.mark.parametrize("out_channels", [None, 24])
def test_dual_attention_matches_reference(out_channels):
    block = randomize_(DualAttention(32, out_channels=out_channels), seed=2).eval()
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 32, 9, 7))).float()
    with torch.no_grad():
        y = block(x)
    assert y.shape == (3, out_channels or 32, 9, 7)
    result = compare("DualAttention", to_numpy(y), ref.dual_attention(to_numpy(x), state_numpy(block)),
                     tolerance("float32"))
    assert result.passed, result.message()


def test_zero_gammas_make_attention_the_identity_bit_for_bit():
    """With both gammas 0 the head's attention part is conv5a/conv5c alone."""
    block = randomize_(DualAttention(32), seed=3).eval()
    with torch.no_grad():
        block.sa.gamma.zero_()
        block.sc.gamma.zero_()
        x = torch.randn(2, 32, 8, 8)
        feat_a, feat_c = block.conv5a(x), block.conv5c(x)
        assert torch.equal(block.sa(feat_a), feat_a)
        assert torch.equal(block.sc(feat_c), feat_c)
        expected = block.conv51(feat_a) + block.conv52(feat_c)
        assert torch.equal(block(x), expected)


def test_training_moves_gamma_off_zero():
    block = DualAttention(32)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    x = torch.randn(2, 32, 6, 6)
    loss = (block(x) - 1.0).pow(2).mean()
    loss.backward()
    assert block.sa.gamma.grad is not None and block.sa.gamma.grad.abs().item() > 0
    assert block.sc.gamma.grad.abs().item() > 0
    opt.step()
    assert block.sa.gamma.item() != 0.0 and block.sc.gamma.item() != 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=2), r"`in_channels` // 4 must be >= 1.*in_channels=2"),
    (dict(in_channels=16, out_channels=0), r"`out_channels` must be an int >= 1, got 0"),
    (dict(in_channels=16, inter_channels=4), r"^`inter_channels`=4 is too few for `reduction`=8 \(PAM's query/key "
                                             r"channels are inter_channels // reduction\): pass `inter_channels` >= 8 "
                                             r"or `reduction` <= 4\.$"),
    (dict(in_channels=16), r"^`in_channels`=16 gives the default `inter_channels` = in_channels // 4 = 4, too few for "
                           r"`reduction`=8 \(PAM's query/key channels are inter_channels // reduction\): use "
                           r"`in_channels` >= 32, or pass `inter_channels` >= 8 or `reduction` <= 4\.$"),
    (dict(in_channels=64, inter_channels=16, reduction=0), r"`reduction` must be an int >= 1, got 0"),
])
def test_bad_dual_attention_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualAttention(**kwargs)


def test_head_too_few_channels_for_reduction_names_the_heads_argument():
    with pytest.raises(ValueError, match=r"^DANetHead: `in_channels`=31 gives inter_channels = in_channels // 4 = 7, "
                                         r"too few for `reduction`=8 \(PAM's query/key channels are inter_channels // "
                                         r"reduction\): use `in_channels` >= 32 or `reduction` <= 7\.$"):
        DANetHead(31, 3)
    assert DANetHead(16, 3, reduction=4).sa.query_conv.out_channels == 1


def test_head_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"DANetHead: `x` has 32 channels .* in_channels=64"):
        DANetHead(64, 3)(torch.zeros(1, 32, 4, 4))
