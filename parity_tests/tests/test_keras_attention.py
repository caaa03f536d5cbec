"""danet_keras attention layers against the float64 NumPy reference, on the current Keras backend.

Weights are drawn in torch layout (``reference``'s convention), set into the
Keras layers through the mirror rule (a torch key walked as attributes and
``Sequential.layers[i]``), and outputs compared in NCHW.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from danet_keras import pam  # noqa: E402
from parity_tests import reference as ref  # noqa: E402
from parity_tests.keras_grad import keras_loss_and_grads  # noqa: E402
from parity_tests.tests.helpers import (check, dual_state_dict, head_state_dict, nchw, nhwc,  # noqa: E402
                                        pam_state_dict, set_torch_weights)
from weights_convert.tolerances import compare, tolerance  # noqa: E402

pytestmark = pytest.mark.keras

SHAPES = [(1, 16, 7, 5), (2, 24, 9, 11), (3, 32, 6, 13)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pam_path", ["official", "efficient"])
def test_position_attention_matches_reference(shape, pam_path, rng):
    x = rng.normal(0, 0.5, shape)
    layer = dk.PositionAttention(pam_path=pam_path)
    layer.build(nhwc(x).shape)
    sd = pam_state_dict(rng, shape[1])
    set_torch_weights(layer, sd)
    y = layer(nhwc(x).astype("float32"))
    expected = ref.position_attention(x.astype("float32"), *(sd[k] for k in (
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma")))
    check(f"PAM{shape} pam_path={pam_path}", nchw(y), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_attention_matches_reference(shape, rng):
    x = rng.normal(0, 0.3, shape)
    layer = dk.ChannelAttention()
    layer.build(nhwc(x).shape)
    layer.gamma.assign(np.array([-0.6], "float32"))
    y = layer(nhwc(x).astype("float32"))
    expected = ref.channel_attention(x.astype("float32"), -0.6)
    check(f"CAM{shape}", nchw(y), expected)
    plain = ref.channel_attention_plain_softmax(x, -0.6)  # the "fixed" CAM is not DANet
    assert not compare("plain", nchw(y), plain, tolerance("float32")).passed


@pytest.mark.parametrize("shape", [(2, 32, 7, 9), (1, 64, 5, 4)])
def test_dual_attention_and_head_match_reference(shape, rng):
    x = rng.normal(0, 0.5, shape)
    c = shape[1]
    dual = dk.DualAttention(out_channels=12)
    dual.build(nhwc(x).shape)
    sd = dual_state_dict(rng, c, c // 4, 12)
    set_torch_weights(dual, sd)
    check("DualAttention", nchw(dual(nhwc(x).astype("float32"))), ref.dual_attention(x, sd))
    sa, sc = dual.forward_branches(nhwc(x).astype("float32"))
    for got, want, name in zip((sa, sc), ref.dual_attention_branches(x, sd), ("sa_conv", "sc_conv")):
        check(name, nchw(got), want)

    head = dk.DANetHead(5)
    head.build(nhwc(x).shape)
    sd = head_state_dict(rng, c, 5)
    set_torch_weights(head, sd)
    outs = head(nhwc(x).astype("float32"), training=False)
    for got, want, name in zip(outs, ref.danet_head(x, sd), ("fused", "pam", "cam")):
        check(f"DANetHead.{name}", nchw(got), want)


def test_channels_first_matches_channels_last(rng):
    x = rng.normal(0, 0.5, (2, 32, 7, 9)).astype("float32")
    sd = head_state_dict(rng, 32, 4)
    last, first = dk.DANetHead(4), dk.DANetHead(4, data_format="channels_first")
    last.build(nhwc(x).shape)
    first.build(x.shape)
    set_torch_weights(last, sd)
    set_torch_weights(first, sd)
    for a, b in zip(last(nhwc(x)), first(x)):
        check("channels_first", keras.ops.convert_to_numpy(b), nchw(a))


def test_gamma_zero_returns_input_exactly(rng):
    x = nhwc(rng.normal(0, 1, (2, 16, 5, 7))).astype("float32")
    for layer in (dk.PositionAttention(), dk.ChannelAttention()):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)


@pytest.mark.parametrize("hw", [(7, 9), (13, 5)])
def test_efficient_paths_equal_official(hw, rng, monkeypatch):
    b, n, cq, c = 2, hw[0] * hw[1], 4, 32
    q, k = (rng.normal(0, 1, (b, n, cq)).astype("float32") for _ in range(2))
    v = rng.normal(0, 1, (b, n, c)).astype("float32")
    official = keras.ops.convert_to_numpy(pam.position_attention_official(q, k, v))
    for rows in (1, 5, 17, n):
        blocks = pam.position_attention_blocks(q, k, v, rows)
        check(f"blocks rows={rows}", keras.ops.convert_to_numpy(blocks), official)
    check("kernel", keras.ops.convert_to_numpy(pam.position_attention_kernel(q, k, v)), official)
    # The layer's own efficient path, forced into several blocks.
    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", b * 6 * n)
    x = rng.normal(0, 0.5, (b, *hw, c)).astype("float32")
    efficient, official_layer = dk.PositionAttention(pam_path="efficient"), dk.PositionAttention(pam_path="official")
    efficient.build(x.shape)
    official_layer.build(x.shape)
    official_layer.set_weights(efficient.get_weights())
    efficient.gamma.assign(np.array([0.9], "float32"))
    official_layer.gamma.assign(np.array([0.9], "float32"))
    assert (efficient.resolved_pam_path, official_layer.resolved_pam_path) == ("efficient", "official")
    check("PAM efficient vs official", keras.ops.convert_to_numpy(efficient(x)),
          keras.ops.convert_to_numpy(official_layer(x)))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("kind", ["pam-official", "pam-efficient", "cam"])
def test_gamma_gradient_under_mixed_precision(kind, policy, rng):
    """``d sum(y) / d gamma = sum(out)``, a sum over every element of the attention's output, against float64
    NumPy. Inputs and V's bias are positive, so the sum (~2e3) does not cancel: summed in the compute dtype
    (float16's spacing is 2 there, bfloat16's 16) it lands far outside the half-precision tolerance."""
    x = rng.uniform(0.5, 1.5, (2, 16, 37, 53))
    sd = pam_state_dict(rng, 16)
    sd["value_conv.bias"] = np.abs(sd["value_conv.bias"]) + 1.0
    sd["gamma"] = np.array([0.5])
    if kind == "cam":
        layer, reference = dk.ChannelAttention(dtype=policy), lambda g: ref.channel_attention(x, g)
    else:
        layer = dk.PositionAttention(pam_path=kind.split("-")[1], dtype=policy)
        reference = lambda g: ref.position_attention(x, *(sd[k] for k in (  # noqa: E731
            "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
            "value_conv.weight", "value_conv.bias")), g)
    layer.build(nhwc(x).shape)
    set_torch_weights(layer, {k: v for k, v in sd.items() if kind != "cam" or k == "gamma"})
    x = x.astype(ml_dtypes.bfloat16 if policy == "mixed_bfloat16" else np.float16)  # as from a layer before it
    _, _, grads = keras_loss_and_grads(layer, nhwc(x), [np.ones(nhwc(x).shape)])
    expected = (reference(1.0) - x.astype(np.float64)).sum()  # gamma's coefficient in y
    assert expected > 1e3
    check(f"{kind} d/d gamma under {policy}", grads[id(layer.gamma)], np.array([expected]),
          policy.split("_")[1], "grad")


@pytest.mark.parametrize("dtype", ["int32", "bool", "uint8"])
@pytest.mark.parametrize("make", [
    lambda **kw: dk.PositionAttention(**kw), lambda **kw: dk.ChannelAttention(**kw),
    lambda **kw: dk.DualAttention(**kw), lambda **kw: dk.DANetHead(3, **kw), lambda **kw: dk.Bottleneck(16, **kw),
    lambda **kw: dk.DilatedResNet(50, **kw), lambda **kw: dk.DANet(3, backbone="resnet50", **kw),
], ids=["pam", "cam", "dual", "head", "bottleneck", "resnet", "danet"])
def test_non_floating_dtype_policies_are_refused_when_constructed(make, dtype):
    with pytest.raises(ValueError, match=f"`dtype` must be a floating-point dtype policy .*, got '{dtype}'"):
        make(dtype=dtype)


def test_dropout_must_be_a_number():
    for dropout in ("a", None, True, 1.0, -0.1):
        with pytest.raises(ValueError, match=rf"`dropout` must be a number in \[0, 1\), got {dropout!r}"):
            dk.DANetHead(3, dropout=dropout)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="`inputs` must be 4-D"):
        dk.PositionAttention()(np.zeros((2, 8, 16), "float32"))
    pam = dk.PositionAttention()
    pam(np.zeros((1, 4, 4, 16), "float32"))
    with pytest.raises(ValueError, match="built for 16 channels"):
        pam(np.zeros((1, 4, 4, 24), "float32"))
    with pytest.raises(ValueError, match=r"PositionAttention: `inputs` of shape \(1, 4, 4, 4\) has 4 channels .* "
                                         r"too few for `reduction`=8"):
        dk.PositionAttention()(np.zeros((1, 4, 4, 4), "float32"))
    with pytest.raises(ValueError, match=r"DualAttention: `inputs` of shape \(1, 4, 4, 16\) has 16 channels "
                                         r"\(data_format='channels_last' reads it as \(B, H, W, C\)\); the default "
                                         r"`inter_channels` = C // 4 = 4 is too few for `reduction`=8: use inputs "
                                         r"with >= 32 channels, or pass `inter_channels` >= 8 or a smaller `reduction`"):
        dk.DualAttention()(np.zeros((1, 4, 4, 16), "float32"))
    with pytest.raises(ValueError, match=r"`inputs` of shape \(1, 5, 6, 32\) has 5 channels \(data_format="
                                         r"'channels_first' reads it as \(B, C, H, W\)\)"):  # an NHWC tensor
        dk.DualAttention(data_format="channels_first")(np.zeros((1, 5, 6, 32), "float32"))
    with pytest.raises(ValueError, match=r"DANetHead: `inputs` of shape \(1, 4, 4, 16\) has 16 channels .* too few "
                                         r"for `reduction`=8"):
        dk.DANetHead(3)(np.zeros((1, 4, 4, 16), "float32"))
    with pytest.raises(ValueError, match=r"`inter_channels`=4 is too few for `reduction`=8; pass `inter_channels` "
                                         r">= 8 or `reduction` <= 4"):
        dk.DualAttention(inter_channels=4)  # both known: refused when constructed
    with pytest.raises(ValueError, match="`pam_path`"):
        dk.PositionAttention(pam_path="yes")
    with pytest.raises(ValueError, match="`reduction`"):
        dk.PositionAttention(reduction=0)
    with pytest.raises(ValueError, match="`data_format`"):
        dk.ChannelAttention(data_format="NHWC")


def test_head_refuses_the_trunk_widths_it_fixes():
    """DANetHead's widths are the official head's (inter = out = C // 4): an `inter_channels` or `out_channels`
    given to it (DualAttention's arguments, which it inherits) is refused, not dropped, as danet_torch's
    DANetHead refuses them; None, what a config of the trunk holds, is accepted."""
    for name in ("inter_channels", "out_channels"):
        with pytest.raises(TypeError, match=rf"DANetHead takes no `{name}` \(got 64\): its widths are the "
                                            r"official head's, C // 4 .*; use DualAttention"):
            dk.DANetHead(3, **{name: 64})
    head = dk.DANetHead(3, inter_channels=None, out_channels=None)
    head.build((None, None, None, 32))
    assert head.conv5a.layers[0].filters == head.conv51.layers[0].filters == 8
