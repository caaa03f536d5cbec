"""Position and channel attention (DANet, Fu et al., CVPR 2019), NCHW.

The official code (``encoding/nn/da_att.py``) is reproduced exactly,
including the parts that look like mistakes but define the model: no
``1/sqrt(d)`` in PAM, and CAM's ``max(E) - E`` before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._checks import check_input, check_positive_int
from .pam import check_path, is_exporting, position_attention_efficient, position_attention_official, resolve_path

__all__ = ["PositionAttention", "ChannelAttention", "PAM_Module", "CAM_Module"]


class PositionAttention(nn.Module):
    """Position attention module (PAM), the official ``PAM_Module``.

    ``energy = Q^T K`` over all ``N = H * W`` positions (no ``1/sqrt(d)``
    scaling), ``attention = softmax(energy, dim=-1)``, ``out = V attention^T``,
    ``y = gamma * out + x`` with ``gamma`` initialised to zero.

    Args:
        in_channels: Channels ``C`` of the input.
        reduction: Query/key channels are ``C // reduction`` (8 upstream).
        pam_path: ``"auto"`` (default), ``"official"`` or ``"efficient"``.
            ``"official"`` is upstream's ``bmm`` + ``N x N`` softmax;
            ``"efficient"`` computes the same function, forward and
            backward, without the ``N x N`` matrix (see
            :mod:`danet_torch.pam`); ``"auto"`` is resolved once, here, to
            one of them (``"efficient"`` unless ``DANET_PAM_PATH`` says
            otherwise) and kept in ``resolved_pam_path``. The official path is
            always used while exporting.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, in_channels: int, reduction: int = 8, pam_path: str = "auto"):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("reduction", reduction)
        if in_channels // reduction == 0:
            raise ValueError(
                f"`in_channels // reduction` must be >= 1 (query/key channels), got "
                f"in_channels={in_channels}, reduction={reduction}; use in_channels >= reduction.")
        check_path(pam_path, "pam_path")
        self.in_channels = in_channels
        self.reduction = reduction
        self.pam_path = pam_path
        self.resolved_pam_path = resolve_path(pam_path)
        key_channels = in_channels // reduction
        self.query_conv = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2)  # (B, C', N)
        k = self.key_conv(x).flatten(2)  # (B, C', N)
        v = self.value_conv(x).flatten(2)  # (B, C, N)
        if self.resolved_pam_path == "official" or is_exporting():
            out = position_attention_official(q, k, v)
        else:
            out = position_attention_efficient(q, k, v)
        # gamma is float32 under autocast; keep the input's dtype like CAM does.
        return (self.gamma * out.reshape(b, c, h, w) + x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, reduction={self.reduction}, pam_path={self.pam_path!r}"

    def attention_rows(self, x: torch.Tensor, points) -> torch.Tensor:
        """PAM's softmax rows for the query ``points`` only, never the ``N x N`` matrix.

        Args:
            x: ``(B, C, H, W)``, this module's input.
            points: ``(row, col)`` integer pairs on x's ``H x W`` grid.

        Returns:
            ``(B, P, H, W)``: how much every position contributes to each
            query. Path-independent (see :mod:`danet_torch.attention_maps`).
        """
        from .attention_maps import position_attention_rows

        return position_attention_rows(self, x, points)


class ChannelAttention(nn.Module):
    """Channel attention module (CAM), the official ``CAM_Module``.

    ``energy = X X^T`` (``C x C``), ``energy_new = max(energy, -1) - energy``,
    ``attention = softmax(energy_new, -1)``, ``y = gamma * (attention X) + x``.

    Softmax is shift-invariant, so ``softmax(max(E) - E) == softmax(-E)``:
    the module gives *more* weight to *less* similar channels. This is what
    the official code and the released weights do (upstream issues 9, 15,
    48, 106 ask about it); we keep it on purpose, it is not a stability
    trick to "fix".

    Under ``torch.autocast`` (or with half-precision inputs) the energy, a sum
    over ``N`` products that passes float16's 65504 easily, is computed in
    float32, and the result is cast back to the input's dtype.

    Args:
        in_channels: Optional; when given, inputs are checked against it.
            CAM has no weights but ``gamma``.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, in_channels: int | None = None):
        super().__init__()
        if in_channels is not None:
            check_positive_int("in_channels", in_channels)
        self.in_channels = in_channels
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        b, c, h, w = x.shape
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.reshape(b, c, h * w).to(compute_dtype)
            energy = torch.bmm(xf, xf.transpose(1, 2))
            energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
            attention = torch.softmax(energy_new, dim=-1)
            out = torch.bmm(attention, xf).view(b, c, h, w)
            y = self.gamma.to(compute_dtype) * out + x.to(compute_dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"

    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """CAM's attention ``softmax(max(E) - E)``, ``E = X X^T``: ``(B, C, C)`` for ``x`` ``(B, C, H, W)``.

        Less similar channels get more weight (the official max-subtraction);
        see :mod:`danet_torch.attention_maps`.
        """
        from .attention_maps import channel_attention_matrix

        return channel_attention_matrix(self, x)


# Official names, so code ported from upstream keeps working.
PAM_Module = PositionAttention
CAM_Module = ChannelAttention
