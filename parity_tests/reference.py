"""Float64 NumPy reference of DANet's attention head, written from the formulas.

Nothing here calls PyTorch or Keras: this is the independent reference both
frameworks are tested against. Arrays are NCHW and weights are in PyTorch
layout (conv kernels ``(O, I, kH, kW)``), the same as the neutral form of
``weights_convert``. Everything is computed in float64.

Formulas (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR
2019, and the official code ``encoding/nn/da_att.py``):

* PAM: ``Q = Wq x + bq``, ``K = Wk x + bk``, ``V = Wv x + bv`` (1x1 convs);
  ``E = Q^T K`` (``N x N``, ``N = H W``, no ``1/sqrt(d)``);
  ``A = softmax(E, axis=-1)``; ``out = V A^T``; ``y = gamma * out + x``.
* CAM: ``X`` is ``C x N``; ``E = X X^T``; ``E' = max(E, axis=-1) - E``;
  ``A = softmax(E', axis=-1)``; ``out = A X``; ``y = gamma * out + x``.
* Attention maps: PAM's rows ``A[n]`` of query positions ``n``; CAM's ``A``;
  image pixel ``p`` -> feature index ``round(p (h - 1) / (H - 1))`` (half up)
  and back ``f (H - 1) / (h - 1)``, the ``align_corners=True`` geometry.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = [
    "softmax",
    "conv2d",
    "batch_norm",
    "relu",
    "position_attention",
    "position_attention_core",
    "position_attention_core_grads",
    "channel_attention",
    "channel_attention_plain_softmax",
    "conv_bn_relu",
    "dual_attention_branches",
    "dual_attention",
    "danet_head",
    "resize_bilinear_align_corners",
    "position_attention_rows",
    "channel_attention_energy",
    "channel_attention_matrix",
    "feature_grid_points",
]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def softmax(e: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64."""
    e = _f64(e)
    z = e - e.max(axis=axis, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=axis, keepdims=True)


def conv2d(x, weight, bias=None, stride: int = 1, padding: int = 0, dilation: int = 1):
    """2-D cross-correlation like ``torch.nn.functional.conv2d`` (zero padding).

    Args:
        x: ``(B, I, H, W)``.
        weight: ``(O, I, kH, kW)``.
        bias: ``(O,)`` or ``None``.
    Returns:
        ``(B, O, Ho, Wo)`` in float64.
    """
    x, w = _f64(x), _f64(weight)
    b_, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((b_, o, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dilation: i * dilation + stride * (ho - 1) + 1: stride,
                       j * dilation: j * dilation + stride * (wo - 1) + 1: stride]
            out += np.einsum("bihw,oi->bohw", patch, w[:, :, i, j])
    if bias is not None:
        out += _f64(bias)[None, :, None, None]
    return out


def batch_norm(x, weight, bias, running_mean, running_var, eps: float = 1e-5):
    """Inference-mode BatchNorm over the channel axis of an NCHW array."""
    shape = (1, -1, 1, 1)
    inv = 1.0 / np.sqrt(_f64(running_var) + eps)
    return ((_f64(x) - _f64(running_mean).reshape(shape)) * inv.reshape(shape)
            * _f64(weight).reshape(shape) + _f64(bias).reshape(shape))


def relu(x):
    return np.maximum(_f64(x), 0.0)


def position_attention(x, wq, bq, wk, bk, wv, bv, gamma):
    """Position attention module (PAM), float64.

    Args:
        x: ``(B, C, H, W)``.
        wq, wk: ``(C', C, 1, 1)`` and biases ``(C',)``; wv ``(C, C, 1, 1)``, bv ``(C,)``.
        gamma: scalar or shape ``(1,)``.
    Returns:
        ``(B, C, H, W)``: ``gamma * (V softmax(Q^T K)^T) + x``.
    """
    x = _f64(x)
    b, c, h, w = x.shape
    q = conv2d(x, wq, bq).reshape(b, -1, h * w)
    k = conv2d(x, wk, bk).reshape(b, -1, h * w)
    v = conv2d(x, wv, bv).reshape(b, -1, h * w)
    out = position_attention_core(*(t.transpose(0, 2, 1) for t in (q, k, v)))
    return float(np.ravel(gamma)[0]) * out.transpose(0, 2, 1).reshape(b, c, h, w) + x


def position_attention_core(q, k, v):
    """PAM's attention on tokens, float64: ``softmax(Q K^T) V`` for ``(B, N, C'), (B, N, C'), (B, N, C)``."""
    energy = np.einsum("bnc,bmc->bnm", _f64(q), _f64(k))  # no 1/sqrt(d): the official PAM
    return np.einsum("bnm,bmc->bnc", softmax(energy, axis=-1), _f64(v))


def position_attention_core_grads(q, k, v, weight):
    """``(dq, dk, dv)`` of ``sum(position_attention_core(q, k, v) * weight)``, float64, by the chain rule:
    ``dV = P^T W``, ``dS = P * (W V^T - rowsum(W V^T * P))``, ``dQ = dS K``, ``dK = dS^T Q``."""
    q, k, v, weight = (_f64(t) for t in (q, k, v, weight))
    p = softmax(np.einsum("bnc,bmc->bnm", q, k), axis=-1)
    dp = np.einsum("bnc,bmc->bnm", weight, v)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return np.einsum("bnm,bmc->bnc", ds, k), np.einsum("bnm,bnc->bmc", ds, q), np.einsum("bnm,bnc->bmc", p, weight)


def channel_attention(x, gamma):
    """Channel attention module (CAM) with the official max-subtraction, float64.

    ``softmax(max(E) - E) == softmax(-E)``: less similar channels get more
    weight. This reproduces the official code on purpose.
    """
    x = _f64(x)
    b, c, h, w = x.shape
    xf = x.reshape(b, c, h * w)
    energy = np.einsum("bcn,bdn->bcd", xf, xf)
    energy_new = energy.max(axis=-1, keepdims=True) - energy
    attention = softmax(energy_new, axis=-1)
    out = np.einsum("bcd,bdn->bcn", attention, xf).reshape(b, c, h, w)
    return float(np.ravel(gamma)[0]) * out + x


def channel_attention_plain_softmax(x, gamma):
    """CAM with ``softmax(E)`` instead of the official ``softmax(max(E) - E)``.

    Not DANet: a "fixed" CAM that the tests use to show ours is not this one.
    """
    x = _f64(x)
    b, c, h, w = x.shape
    xf = x.reshape(b, c, h * w)
    attention = softmax(np.einsum("bcn,bdn->bcd", xf, xf), axis=-1)
    out = np.einsum("bcd,bdn->bcn", attention, xf).reshape(b, c, h, w)
    return float(np.ravel(gamma)[0]) * out + x


def conv_bn_relu(x, sd: Mapping[str, np.ndarray], prefix: str, eps: float = 1e-5):
    """``Sequential(Conv2d(3x3, pad 1, no bias), BatchNorm2d, ReLU)`` in eval mode."""
    y = conv2d(x, sd[f"{prefix}.0.weight"], None, padding=1)
    y = batch_norm(y, sd[f"{prefix}.1.weight"], sd[f"{prefix}.1.bias"],
                   sd[f"{prefix}.1.running_mean"], sd[f"{prefix}.1.running_var"], eps)
    return relu(y)


def _pam_from(sd, x, prefix="sa"):
    return position_attention(
        x, sd[f"{prefix}.query_conv.weight"], sd[f"{prefix}.query_conv.bias"],
        sd[f"{prefix}.key_conv.weight"], sd[f"{prefix}.key_conv.bias"],
        sd[f"{prefix}.value_conv.weight"], sd[f"{prefix}.value_conv.bias"],
        sd[f"{prefix}.gamma"])


def dual_attention_branches(x, sd: Mapping[str, np.ndarray]):
    """``(sa_conv, sc_conv)`` of the DANet head, eval mode, from a state_dict."""
    sa_conv = conv_bn_relu(_pam_from(sd, conv_bn_relu(x, sd, "conv5a")), sd, "conv51")
    sc_conv = conv_bn_relu(channel_attention(conv_bn_relu(x, sd, "conv5c"), sd["sc.gamma"]),
                           sd, "conv52")
    return sa_conv, sc_conv


def dual_attention(x, sd: Mapping[str, np.ndarray]):
    """``DualAttention`` (the head's attention trunk): ``sa_conv + sc_conv``."""
    sa_conv, sc_conv = dual_attention_branches(x, sd)
    return sa_conv + sc_conv


def danet_head(x, sd: Mapping[str, np.ndarray]):
    """``DANetHead`` in eval mode (dropout is identity): ``(fused, pam, cam)``."""
    sa_conv, sc_conv = dual_attention_branches(x, sd)

    def classifier(t, name):
        return conv2d(t, sd[f"{name}.1.weight"], sd[f"{name}.1.bias"])

    return classifier(sa_conv + sc_conv, "conv8"), classifier(sa_conv, "conv6"), classifier(sc_conv, "conv7")


def resize_bilinear_align_corners(x, size):
    """Bilinear resize of an NCHW array with ``align_corners=True`` semantics."""
    x = _f64(x)
    h, w = x.shape[-2:]
    oh, ow = size

    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        if n_out == 1 or n_in == 1:
            m[:, 0] = 1.0
            return m
        pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
        frac = pos - lo
        m[np.arange(n_out), lo] = 1.0 - frac
        m[np.arange(n_out), lo + 1] += frac
        return m

    return np.einsum("oh,bchw,pw->bcop", matrix(h, oh), x, matrix(w, ow))


def position_attention_rows(x, wq, bq, wk, bk, points):
    """PAM's attention rows of the query ``points``, float64.

    Args:
        x: ``(B, C, H, W)``.
        wq, wk: ``(C', C, 1, 1)``; bq, bk: ``(C',)``.
        points: ``(row, col)`` pairs on the ``H x W`` grid.
    Returns:
        ``(B, P, H, W)``: row ``n = row * W + col`` of ``softmax(Q^T K)``.
    """
    x = _f64(x)
    b, c, h, w = x.shape
    q = conv2d(x, wq, bq).reshape(b, -1, h * w)
    k = conv2d(x, wk, bk).reshape(b, -1, h * w)
    idx = [int(r) * w + int(col) for r, col in points]
    energy = np.einsum("bcp,bcm->bpm", q[:, :, idx], k)  # rows n of Q^T K, no 1/sqrt(d)
    return softmax(energy, axis=-1).reshape(b, len(idx), h, w)


def channel_attention_energy(x):
    """CAM's energy ``X X^T``, ``(B, C, C)``, float64."""
    xf = _f64(x).reshape(x.shape[0], x.shape[1], -1)
    return np.einsum("bcn,bdn->bcd", xf, xf)


def channel_attention_matrix(x):
    """CAM's attention after the official max-subtraction: ``softmax(max(E) - E)``, ``(B, C, C)``."""
    energy = channel_attention_energy(x)
    return softmax(energy.max(axis=-1, keepdims=True) - energy, axis=-1)


def feature_grid_points(points, image_size, feature_size):
    """Image pixels -> feature grid (nearest, halves up) and back, the ``align_corners=True`` geometry.

    Returns:
        ``(grid, image_points)``: ``(P, 2)`` int64 and ``(P, 2)`` float64.
    """
    p = _f64(points).reshape(-1, 2)
    grid, back = np.zeros(p.shape, dtype=np.int64), np.zeros(p.shape)
    for axis in (0, 1):
        n_in, n_out = image_size[axis], feature_size[axis]
        if n_in > 1 and n_out > 1:
            grid[:, axis] = np.floor(p[:, axis] * (n_out - 1) / (n_in - 1) + 0.5).astype(np.int64)
            back[:, axis] = grid[:, axis] * (n_in - 1) / (n_out - 1)
    return grid, back
