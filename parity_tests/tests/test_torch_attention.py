"""danet_torch.attention against the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet_torch import CAM_Module, ChannelAttention, PAM_Module, PositionAttention
from parity_tests import reference as ref
from weights_convert.testing import randomize_
from parity_tests.tests.helpers import state_numpy, to_numpy
from weights_convert.tolerances import compare, tolerance

SIZES = [(1, 1), (7, 9), (45, 45)]


def _input(batch, channels, h, w, seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, channels, h, w))).to(dtype)


@pytest.mark.parametrize("pam_path", ["official", "efficient"])
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_pam_matches_reference(batch, hw, pam_path):
    pam = randomize_(PositionAttention(16, pam_path=pam_path), seed=batch).eval()
    x = _input(batch, 16, *hw)
    with torch.no_grad():
        y = pam(x)
    sd = state_numpy(pam)
    expected = ref.position_attention(to_numpy(x), sd["query_conv.weight"], sd["query_conv.bias"],
                                      sd["key_conv.weight"], sd["key_conv.bias"],
                                      sd["value_conv.weight"], sd["value_conv.bias"], sd["gamma"])
    assert sd["gamma"][0] != 0
    result = compare(f"PAM pam_path={pam_path} {hw}", to_numpy(y), expected, tolerance("float32"))
    assert result.passed, result.message()


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cam_matches_reference(batch, hw):
    cam = randomize_(ChannelAttention(16), seed=batch)
    x = _input(batch, 16, *hw)
    with torch.no_grad():
        y = cam(x)
    expected = ref.channel_attention(to_numpy(x), to_numpy(cam.gamma))
    result = compare(f"CAM {hw}", to_numpy(y), expected, tolerance("float32"))
    assert result.passed, result.message()


def test_float64_inputs_are_computed_in_float64():
    pam = randomize_(PositionAttention(16)).double()
    cam = randomize_(ChannelAttention()).double()
    x = _input(2, 16, 5, 6, dtype=torch.float64)
    sd = state_numpy(pam)
    with torch.no_grad():
        got_pam, got_cam = pam(x), cam(x)
    assert got_pam.dtype == got_cam.dtype == torch.float64
    exp_pam = ref.position_attention(x.numpy(), sd["query_conv.weight"], sd["query_conv.bias"], sd["key_conv.weight"],
                                     sd["key_conv.bias"], sd["value_conv.weight"], sd["value_conv.bias"], sd["gamma"])
    for name, got, exp in (("PAM", got_pam, exp_pam), ("CAM", got_cam, ref.channel_attention(x.numpy(), to_numpy(cam.gamma)))):
        result = compare(name, got.numpy(), exp, tolerance("float64"))
        assert result.passed, result.message()


def test_gamma_starts_at_zero_and_gives_input_back_exactly():
    x = _input(2, 16, 7, 9)
    for module in (PositionAttention(16), ChannelAttention(16)):
        assert module.gamma.shape == (1,) and module.gamma.item() == 0.0 and module.gamma.requires_grad
        with torch.no_grad():
            assert torch.equal(module(x), x)


def test_pam_has_official_parameters():
    pam = PositionAttention(64)
    shapes = {k: tuple(v.shape) for k, v in pam.state_dict().items()}
    assert shapes == {
        "gamma": (1,),
        "query_conv.weight": (8, 64, 1, 1), "query_conv.bias": (8,),
        "key_conv.weight": (8, 64, 1, 1), "key_conv.bias": (8,),
        "value_conv.weight": (64, 64, 1, 1), "value_conv.bias": (64,),
    }
    assert list(ChannelAttention().state_dict()) == ["gamma"]
    assert PAM_Module is PositionAttention and CAM_Module is ChannelAttention


def test_cam_keeps_the_official_max_subtraction():
    """softmax(max(E) - E) == softmax(-E), and differs from softmax(E)."""
    cam = randomize_(ChannelAttention(), gamma=1.0)
    x = _input(2, 8, 6, 5)
    with torch.no_grad():
        y = to_numpy(cam(x))
    xf = to_numpy(x).reshape(2, 8, -1)
    energy = np.einsum("bcn,bdn->bcd", xf, xf)
    explicit = (np.einsum("bcd,bdn->bcn", ref.softmax(-energy), xf)).reshape(y.shape) + to_numpy(x)
    result = compare("CAM vs softmax(-E)", y, explicit, tolerance("float32"))
    assert result.passed, result.message()
    plain = ref.channel_attention_plain_softmax(to_numpy(x), 1.0)
    assert not compare("CAM vs softmax(E)", y, plain, tolerance("float32")).passed
    assert np.abs(y - plain).max() > 0.1


def _official_cam_half(x, gamma):
    """The official CAM computed in the input's dtype (what upstream does under fp16)."""
    b, c, h, w = x.shape
    q = x.view(b, c, -1)
    energy = torch.bmm(q, q.transpose(1, 2))
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(torch.softmax(energy_new, dim=-1), q).view(b, c, h, w)
    return gamma * out + x


def test_cam_energy_in_float32_does_not_overflow_in_float16():
    # N = 96 * 96 = 9216 values of magnitude 3: energy ~ 82944 > 65504 (float16 max).
    x32 = 3.0 + 0.1 * _input(1, 4, 96, 96)
    x16 = x32.half()
    official = _official_cam_half(x16, torch.tensor([1.0], dtype=torch.float16))
    assert not torch.isfinite(official).all(), "the official fp16 CAM should overflow on this input"
    cam = randomize_(ChannelAttention(), gamma=1.0)
    with torch.no_grad():
        ours = cam(x16)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    expected = ref.channel_attention(to_numpy(x16), 1.0)
    result = compare("CAM fp16", to_numpy(ours), expected, tolerance("float16"))
    assert result.passed, result.message()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = cam(x32.bfloat16())
    assert torch.isfinite(auto).all()
    result = compare("CAM bf16 autocast", to_numpy(auto), ref.channel_attention(to_numpy(x32.bfloat16()), 1.0),
                     tolerance("bfloat16"))
    assert result.passed, result.message()


@pytest.mark.parametrize("make, x, match", [
    (lambda: PositionAttention(16), torch.zeros(2, 16, 4), r"`x` must be 4-D \(B, C, H, W\), got 3-D"),
    (lambda: PositionAttention(16), torch.zeros(1, 8, 4, 4), r"`x` has 8 channels .* in_channels=16"),
    (lambda: ChannelAttention(16), torch.zeros(1, 8, 4, 4), r"`x` has 8 channels .* in_channels=16"),
    (lambda: ChannelAttention(), torch.zeros(1, 8, 4, 4, dtype=torch.int64), r"`x` must have a floating dtype.*int64"),
    (lambda: PositionAttention(16), torch.zeros(1, 16, 4, 4, dtype=torch.int32), r"floating dtype.*int32"),
])
def test_bad_input_is_refused_with_a_clear_message(make, x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()(x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=4), r"`in_channels // reduction` must be >= 1.*in_channels=4, reduction=8"),
    (dict(in_channels=0), r"`in_channels` must be an int >= 1, got 0"),
    (dict(in_channels=16, reduction=0), r"`reduction` must be an int >= 1, got 0"),
    (dict(in_channels=16, pam_path="yes"), r"`pam_path` must be one of 'auto', 'official', 'efficient', got 'yes'"),
])
def test_bad_pam_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PositionAttention(**kwargs)
