"""Key renames into our (the official) names: training-script wrappers and mmsegmentation.

* Official / ours: a state_dict, or a dict with ``state_dict`` (the official
  training script's checkpoint, also mmseg's with ``meta``); a ``module.``
  prefix (DataParallel) is removed.
* mmsegmentation ``DAHead`` (``decode_head.*``) into ``DANetHead`` names, and
  its ``ResNetV1c`` backbone (``backbone.*``) into our deep-stem backbone when
  the shapes match; otherwise the head alone, with a note saying so. mmseg's
  FCN auxiliary head is reported as skipped.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .arch import ArchSpec, BACKBONE_DEPTHS, expected_shapes
from .errors import ConvertError

__all__ = ["import_checkpoint", "import_mmseg", "MMSEG_HEAD_MAP", "MMSEG_STEM_MAP"]

# mmseg DAHead prefix -> our DANetHead prefix
MMSEG_HEAD_MAP = OrderedDict([
    ("pam_in_conv.conv.", "conv5a.0."), ("pam_in_conv.bn.", "conv5a.1."),
    ("cam_in_conv.conv.", "conv5c.0."), ("cam_in_conv.bn.", "conv5c.1."),
    ("pam.query_project.", "sa.query_conv."), ("pam.key_project.", "sa.key_conv."),
    ("pam.value_project.", "sa.value_conv."), ("pam.gamma.scale", "sa.gamma"), ("cam.gamma.scale", "sc.gamma"),
    ("pam_out_conv.conv.", "conv51.0."), ("pam_out_conv.bn.", "conv51.1."),
    ("cam_out_conv.conv.", "conv52.0."), ("cam_out_conv.bn.", "conv52.1."),
    ("pam_conv_seg.", "conv6.1."), ("cam_conv_seg.", "conv7.1."), ("conv_seg.", "conv8.1."),
])
# mmseg ResNetV1c stem Sequential index -> our deep stem (conv, BN, ReLU, conv, BN, ReLU, conv | bn1)
MMSEG_STEM_MAP = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}


def _preview(keys, n=3):
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def import_checkpoint(obj, notes: list):
    """``(neutral, hints)`` from a file's top-level object; ``hints`` are ArchSpec fields.

    Raises:
        ConvertError: not a mapping of arrays.
    """
    if not isinstance(obj, dict):
        raise ConvertError(f"The checkpoint holds a {type(obj).__name__}, not a state_dict; accepted: a dict of "
                           f"tensors, or a dict with a `state_dict` entry.")
    if isinstance(obj.get("state_dict"), dict):
        extras = [k for k in obj if k != "state_dict"]
        if extras:
            notes.append(f"ignored the checkpoint's non-weight entries: {', '.join(map(str, extras))}")
        obj = obj["state_dict"]
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ConvertError(f"The state_dict has non-tensor entries (key, type): {bad[:5]}; accepted: tensors "
                           f"only, or a dict with a `state_dict` entry.")
    sd = OrderedDict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
        notes.append("removed the `module.` prefix (DataParallel)")
    if any(k.startswith(("decode_head.", "backbone.", "auxiliary_head.")) for k in sd):
        return import_mmseg(sd, notes)
    return sd, {}


def _rename_head(sd, prefix_out):
    head = OrderedDict()
    for k, v in sd.items():
        if not k.startswith("decode_head."):
            continue
        rest = k[len("decode_head."):]
        for src, dst in MMSEG_HEAD_MAP.items():
            if rest.startswith(src):
                new = dst + rest[len(src):]
                if src.endswith("gamma.scale"):
                    v = np.asarray(v).reshape(1)  # mmseg's Scale is 0-dim; ours is (1,)
                head[prefix_out + new] = v
                break
        else:
            head[k] = v  # unknown: kept under its mmseg name, so the strict check lists it
    return head


def _rename_backbone(sd):
    out = OrderedDict()
    for k, v in sd.items():
        if not k.startswith("backbone."):
            continue
        rest = k[len("backbone."):]
        parts = rest.split(".")
        if parts[0] == "stem" and len(parts) > 2 and parts[1] in MMSEG_STEM_MAP:
            rest = ".".join([MMSEG_STEM_MAP[parts[1]]] + parts[2:])
        out["pretrained." + rest] = v
    return out


def import_mmseg(sd, notes: list):
    """mmseg DANet names -> ours; ``(neutral, hints)``."""
    aux = [k for k in sd if k.startswith("auxiliary_head.")]
    if aux:
        notes.append(f"skipped mmseg's FCN auxiliary head ({len(aux)} tensors: {_preview(aux)}): "
                     f"DANet has no auxiliary head")
    other = [k for k in sd if not k.startswith(("decode_head.", "backbone.", "auxiliary_head."))]
    head = _rename_head(sd, "")
    if "conv8.1.weight" not in head:
        raise ConvertError("mmseg checkpoint without `decode_head.conv_seg.weight`: not a DAHead checkpoint.")
    num_classes = head["conv8.1.weight"].shape[0]
    backbone = _rename_backbone(sd)
    notes.append("renamed mmseg DAHead keys (decode_head.pam_in_conv.conv -> conv5a.0, pam.gamma.scale -> "
                 "sa.gamma, ...)")
    if backbone:
        n3 = len({k.split(".")[2] for k in backbone if k.startswith("pretrained.layer3.")})
        depth = {d[2]: name for name, d in BACKBONE_DEPTHS.items()}.get(n3)
        mismatch = None
        if depth is None:
            mismatch = f"layer3 has {n3} blocks, expected 6 (ResNet-50) or 23 (ResNet-101)"
        else:
            expected = {k: v for k, v in expected_shapes(ArchSpec(
                "danet", num_classes=num_classes, backbone=depth, deep_stem=True)).items()
                if k.startswith("pretrained.")}
            for k, shape in expected.items():
                if k not in backbone or tuple(backbone[k].shape) != shape:
                    found = tuple(backbone[k].shape) if k in backbone else "missing"
                    mismatch = f"`{k}` expected {shape}, found {found}"
                    break
            if mismatch is None and set(backbone) - set(expected):
                mismatch = f"unexpected backbone keys {_preview(sorted(set(backbone) - set(expected)))}"
        if mismatch is None:
            notes.append("mapped mmseg's ResNetV1c backbone onto the deep-stem backbone (backbone.stem.0/1/3/4/6 "
                         "-> pretrained.conv1.*, stem.7 -> pretrained.bn1); mmseg dilates every block of "
                         "layer3/layer4 (2, 4) without multi-grid and resizes with align_corners=False: "
                         "outputs differ from mmseg's even with equal weights")
            out = OrderedDict(list(backbone.items()) + [("head." + k, v) for k, v in head.items()])
            for k in other:
                out[k] = sd[k]
            return out, {"arch": "danet", "deep_stem": True, "backbone": depth, "multi_grid": None}
        stem = [tuple(sd[k].shape[:2]) for k in ("backbone.stem.0.weight", "backbone.stem.3.weight",
                                                 "backbone.stem.6.weight") if k in sd]
        notes.append(f"mmseg's backbone does not match DANet's deep-stem ResNet ({mismatch}; mmseg stem convs "
                     f"(out, in) {stem}, ours (64, 3), (64, 64), (128, 64)): imported the head alone "
                     f"(DANetHead), skipped {len(backbone)} backbone tensors")
    for k in other:
        head[k] = sd[k]
    return head, {"arch": "head"}
