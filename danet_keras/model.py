"""DANet (Fu et al., CVPR 2019) as a Keras 3 model: dilated ResNet + ``DANetHead``, three outputs."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from weights_convert.arch import check_flag, check_multi_grid

from ._checks import check_floating_policy, check_inputs, check_positive_int, check_shape, standardize_data_format
from .backbone import DilatedResNet
from .head import DANetHead
from .layers import keep_frozen, layout_axes, no_init_weights, resize_bilinear_align_corners
from .pam import check_path, path_from_legacy

__all__ = ["DANet", "BACKBONES"]

BACKBONES = {"resnet50": 50, "resnet101": 101}


@keras.saving.register_keras_serializable(package="danet")
class DANet(keras.Model):
    """DANet with the official attribute names (``pretrained``, ``head``).

    The defaults reproduce the released Cityscapes checkpoint's architecture:
    ResNet-101, output stride 8, 7x7 stem, layer4 multi-grid dilations
    (4, 8, 16). Inputs are ImageNet-normalised RGB; normalisation happens
    outside the model, as upstream.

    Args:
        num_classes: Classes (19 for Cityscapes).
        backbone: ``"resnet50"`` or ``"resnet101"``.
        output_stride: 8 or 16 (32: plain ResNet).
        deep_stem: Three 3x3 stem convs instead of the 7x7 conv.
        multi_grid: layer4 dilations, or ``None`` for the plain dilated rule.
        dropout: ``SpatialDropout2D`` rate before each classifier.
        pam_path: PAM's path, ``"auto"``, ``"official"`` or ``"efficient"``
            (see :class:`~danet_keras.PositionAttention`).
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        in_channels: Input channels (3: RGB; 1 for MRI, 4 for RGB + another band, ...).
        pretrained_backbone: Path of ImageNet ResNet weights (torchvision/timm
            keys, ``.pth``/``.safetensors``/``.npz``) loaded into ``pretrained``
            by :meth:`load_pretrained_backbone` (which builds the model);
            ``None`` keeps the random init. Not part of the config: a saved
            model carries its weights.

    Returns:
        ``(fused, pam, cam)`` logits, each ``(B, H, W, num_classes)`` at the
        input size, upsampled bilinearly with ``align_corners=True``.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8,
                 deep_stem: bool = False, multi_grid: Sequence[int] | None = (4, 8, 16), dropout: float = 0.1,
                 pam_path: str = "auto", data_format=None, in_channels: int = 3, pretrained_backbone=None,
                 **kwargs):
        pam_path = path_from_legacy(pam_path, kwargs, "pam_path")
        super().__init__(**kwargs)
        check_floating_policy(self)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {sorted(BACKBONES)}, got {backbone!r}.")
        self.backbone, self.output_stride = backbone, output_stride
        self.deep_stem, self.multi_grid = check_flag("deep_stem", deep_stem), check_multi_grid(multi_grid)
        self.dropout, self.pam_path = float(dropout), check_path(pam_path, "pam_path")
        self.data_format = standardize_data_format(data_format)
        self.pretrained = DilatedResNet(BACKBONES[backbone], output_stride=output_stride, deep_stem=deep_stem,
                                        multi_grid=self.multi_grid, data_format=self.data_format,
                                        in_channels=in_channels, dtype=self.dtype_policy, name="pretrained")
        self.in_channels = self.pretrained.in_channels
        self.head = DANetHead(num_classes, dropout=dropout, pam_path=pam_path, data_format=self.data_format,
                              dtype=self.dtype_policy, name="head")
        self.backbone_notes: list = []
        if pretrained_backbone is not None:
            self.backbone_notes = self.load_pretrained_backbone(pretrained_backbone)

    def load_pretrained_backbone(self, path) -> list:
        """Load ImageNet ResNet weights into ``pretrained``, strictly; returns the reader's notes.

        Reads ``path`` with :func:`weights_convert.backbone.read_imagenet_backbone`
        (``fc.*`` ignored, ``conv1`` adapted to ``in_channels`` by timm's rule),
        builds the model if needed (any spatial size; the backbone without
        random draws, :func:`~danet_keras.layers.no_init_weights`, the head with
        them) and assigns every backbone variable through the converter's name
        table (``weights_convert.mapping``).
        """
        from weights_convert.backbone import read_imagenet_backbone
        from weights_convert.mapping import keras_table, resolve_keras, to_keras_layout

        neutral, notes = read_imagenet_backbone(path, depth=self.pretrained.depth, deep_stem=self.deep_stem,
                                                in_channels=self.in_channels)
        if not self.built:
            c = self.in_channels
            shape = (None, c, None, None) if self.data_format == "channels_first" else (None, None, None, c)
            with no_init_weights():  # every backbone weight is assigned below; the head draws as usual
                self.pretrained.build(shape)
            self.build(shape)
        assigned = set()
        for row in keras_table(neutral):
            var = resolve_keras(self, row.keras_path)
            value = to_keras_layout(neutral[row.torch_name], row.rule)
            if tuple(var.shape) != tuple(value.shape):
                raise ValueError(f"`pretrained_backbone`: {row.torch_name} has shape {row.torch_shape}, the Keras "
                                 f"variable {var.path} {tuple(var.shape)} (Keras layout).")
            var.assign(value.astype(keras.backend.standardize_dtype(var.dtype)))
            assigned.add(id(var))
        left = [v.path for v in self.pretrained.weights if id(v) not in assigned]
        if left:
            raise ValueError(f"`pretrained_backbone` left {len(left)} backbone variable(s) unset: {left[:5]}.")
        return notes

    def build(self, input_shape):
        check_shape("DANet", input_shape, self.data_format, self.in_channels)
        if not self.pretrained.built:  # already built by load_pretrained_backbone
            self.pretrained.build(input_shape)
        if not self.head.built:
            self.head.build(self.pretrained.compute_output_shape(input_shape)[-1])
        keep_frozen(self)  # its two parts were made after the constructor's `trainable`
        self.built = True

    def call(self, inputs, training=None):
        check_inputs("DANet", inputs, self.data_format, self.in_channels)
        h_ax, w_ax, _ = layout_axes(self.data_format)
        shape = ops.shape(inputs)
        size = (shape[h_ax], shape[w_ax])
        c4 = self.pretrained(inputs, training=training)[-1]
        return tuple(resize_bilinear_align_corners(y, size, self.data_format)
                     for y in self.head(c4, training=training))

    def compute_output_shape(self, input_shape):
        check_shape("DANet", input_shape, self.data_format)
        shape = list(input_shape)
        shape[layout_axes(self.data_format)[2]] = self.num_classes
        return tuple(shape), tuple(shape), tuple(shape)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable,
                  "dtype": keras.saving.serialize_keras_object(self.dtype_policy)}
        config.update(num_classes=self.num_classes, backbone=self.backbone, output_stride=self.output_stride,
                      deep_stem=self.deep_stem, multi_grid=None if self.multi_grid is None else list(self.multi_grid),
                      dropout=self.dropout, pam_path=self.pam_path, data_format=self.data_format,
                      in_channels=self.in_channels)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
        return cls(**config)

    def attention_maps(self, images, points, training=False):
        """What the attention sees for query ``points`` in image pixels (the paper's Figure 4).

        Args:
            images: ``(B, H, W, 3)`` (the model's data format), ImageNet-normalised RGB, concrete.
            points: ``(row, col)`` pixel pairs, mapped to the feature grid with the
                ``align_corners=True`` geometry and back.
            training: Passed to the layers.

        Returns:
            :class:`~danet_keras.attention_maps.AttentionMaps`: ``pam`` ``(B, P, H, W)``,
            ``cam`` ``(B, C, C)``, ``segmentation`` ``(B, H, W)``, the grid points used.
        """
        from .attention_maps import danet_attention_maps

        return danet_attention_maps(self, images, points, training=training)
