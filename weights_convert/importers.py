"""Key renames into our (the official) names: training-script wrappers and mmsegmentation.

* Official / ours: a state_dict, or a dict with ``state_dict`` (the official
  training script's checkpoint, also mmseg's with ``meta``, and ours with
  ``arch``); a ``module.`` prefix (DataParallel) is removed. Other nestings
  (``model``, ``ema``, ...) and prefixes (``model.``) are named in the error
  with the option that selects them (``key``, ``strip_prefix``), and so is a
  DANet module inside another model (``strip_prefix`` with ``allow_partial``).
* mmsegmentation ``DAHead`` (``decode_head.*``) into ``DANetHead`` names, and
  its ``ResNetV1c`` backbone (``backbone.*``) into our deep-stem backbone when
  the shapes match; otherwise refused, or the head alone with
  ``allow_partial``. mmseg's FCN auxiliary head (training only) is reported as
  skipped.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .arch import KINDS, ArchSpec, BACKBONE_DEPTHS, expected_shapes
from .errors import ConvertError
from .infer import detect_kind

__all__ = ["import_checkpoint", "import_mmseg", "check_recognisable", "MMSEG_HEAD_MAP", "MMSEG_STEM_MAP"]

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


# Top-level entries that training scripts nest the weights under, tried in this order by the hint.
NESTING_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "ema", "model_ema", "state_dict_ema",
                "module", "net", "network", "weights")
# First components of the names of every DANet record (and mmseg's); other common prefixes are a wrapper's.
OUR_ROOTS = ("pretrained", "head", "conv5a", "conv5c", "conv51", "conv52", "conv6", "conv7", "conv8", "sa", "sc",
             "query_conv", "key_conv", "value_conv", "gamma", "decode_head", "backbone", "auxiliary_head")
RESNET_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.0.conv1.weight")
# Keys that mark a DANet module (those :func:`~weights_convert.infer.detect_kind` reads), found inside a user's model.
MODULE_MARKERS = ("pretrained.conv1.weight", "pretrained.conv1.0.weight", "conv8.1.weight", "conv5a.0.weight",
                  "query_conv.weight")


def _preview(keys, n=3):
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (", ..." if len(keys) > n else "")


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray)


def _tensor_dicts(obj) -> list:
    """Names of the top-level entries of ``obj`` that are non-empty dicts of arrays."""
    return [k for k, v in obj.items() if isinstance(v, dict) and v and all(_is_array(x) for x in v.values())]


def _select(obj, key, notes):
    """The dict of arrays in a checkpoint: ``obj[key]``, the official ``state_dict`` entry, or ``obj`` itself."""
    if key is not None:
        for part in str(key).split("."):
            if not isinstance(obj, dict) or part not in obj:
                have = _preview(obj.keys(), 8) if isinstance(obj, dict) else type(obj).__name__
                raise ConvertError(f"`--key {key}`: the checkpoint has no entry {part!r} (its entries: {have}).")
            obj = obj[part]
        if not isinstance(obj, dict):
            raise ConvertError(f"`--key {key}` selects a {type(obj).__name__}, not a dict of tensors.")
        return obj
    if isinstance(obj.get("state_dict"), dict):
        extras = [k for k in obj if k not in ("state_dict", "arch")]
        if extras:
            notes.append(f"ignored the checkpoint's non-weight entries: {_preview(extras, 6)}")
        return obj["state_dict"]
    bad = [k for k, v in obj.items() if not _is_array(v)]
    if bad:
        nested = _tensor_dicts(obj)
        nested.sort(key=lambda k: NESTING_KEYS.index(k) if k in NESTING_KEYS else len(NESTING_KEYS))
        hint = (f" The weights look nested under {nested[0]!r} ({len(obj[nested[0]])} tensors): pass "
                f"`--key {nested[0]}`." if nested else "")
        raise ConvertError(f"The checkpoint has non-tensor entries (key: type): "
                           f"{_preview([f'{k}: {type(obj[k]).__name__}' for k in bad], 5)}; accepted: a dict of "
                           f"tensors, or one with a `state_dict` entry.{hint}")
    return obj


def _strip(sd, prefix, notes, allow_partial=False):
    """``sd`` without ``prefix`` (or DataParallel's ``module.``); keys outside the prefix are refused, or, with
    ``allow_partial``, left out: the DANet module inside a user's model (a U-Net's ``bottleneck.1.``) alone."""
    if prefix is not None:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        outside = [k for k in sd if not k.startswith(prefix)]
        if outside and not allow_partial:
            raise ConvertError(f"`--strip-prefix {prefix}`: {len(outside)} key(s) do not start with it "
                               f"({_preview(outside)}); pass --allow-partial to keep only the keys under it.")
        if outside:
            notes.append(f"left out {len(outside)} key(s) outside `{prefix}` ({_preview(outside)})")
        notes.append(f"removed the prefix `{prefix}` from every key")
        return OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))
    if sd and all(k.startswith("module.") for k in sd):
        notes.append("removed the `module.` prefix (DataParallel)")
        return OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def _common_prefix(sd) -> str | None:
    firsts = {k.split(".", 1)[0] for k in sd}
    if len(firsts) == 1 and all("." in k for k in sd):
        first = firsts.pop()
        return None if first in OUR_ROOTS else first + "."
    return None


def _inner_module(sd):
    """``(prefix, kind, keys)`` of the outermost DANet module among the keys of another model, or ``None``."""
    prefixes = {k[:-len(m)] for k in sd for m in MODULE_MARKERS if k.endswith("." + m)}
    for prefix in sorted(prefixes, key=len):
        keys = [k for k in sd if k.startswith(prefix)]
        kind = detect_kind(k[len(prefix):] for k in keys)
        if kind is not None:
            return prefix, kind, keys
    return None


def check_recognisable(sd) -> None:
    """Raise a clear error for weights that are not a DANet record: a wrapper's prefix, a DANet module inside
    another model, an ImageNet ResNet."""
    inner = _inner_module(sd) if detect_kind(sd) is None else None
    others = [k for k in sd if not k.startswith(inner[0])] if inner else []
    if others:
        prefix, kind, keys = inner
        raise ConvertError(f"The weights hold a {KINDS[kind].class_name} under `{prefix}` ({len(keys)} tensors) "
                           f"beside {len(others)} other key(s) ({_preview(others)}): pass `--strip-prefix {prefix} "
                           f"--allow-partial` to convert it alone.")
    prefix = _common_prefix(sd)
    if prefix is not None:
        raise ConvertError(f"Every key starts with `{prefix}` (for example {_preview(sd, 2)}), which no DANet "
                           f"name does: pass `--strip-prefix {prefix}`.")
    if all(k in sd for k in RESNET_KEYS) and not any(k.startswith(("head.", "conv5a.")) for k in sd):
        blocks = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
        depth = {6: "ResNet-50", 23: "ResNet-101"}.get(blocks, f"ResNet with {blocks} layer3 blocks")
        raise ConvertError(
            f"This is an ImageNet {depth} state dict (torchvision/timm names: conv1, bn1, layer1..4"
            f"{', fc' if 'fc.weight' in sd else ''}): a backbone, not a DANet. Start a DANet from it with "
            f"`DANet(num_classes, pretrained_backbone=PATH)` (danet_torch or danet_keras) or "
            f"`danet-train --pretrained-backbone PATH`.")


def import_checkpoint(obj, key: str | None = None, strip_prefix: str | None = None, allow_partial: bool = False):
    """``(weights, hints, notes)`` from a file's top-level object; ``hints`` are record fields.

    Args:
        obj: What the reader returned: a dict of arrays, or a dict nesting one.
        key: The entry that holds the weights (dotted for deeper nesting);
            default: ``state_dict`` when present, else ``obj`` itself.
        strip_prefix: A prefix every key carries (``model.``); default: only
            DataParallel's ``module.`` is removed. With ``allow_partial``, the
            keys outside it are left out.
        allow_partial: Import what fits where the source holds more than a
            DANet can (see :func:`import_mmseg`).

    Raises:
        ConvertError: not a mapping of arrays, with what to pass instead.
    """
    notes: list = []
    if not isinstance(obj, dict):
        raise ConvertError(f"The checkpoint holds a {type(obj).__name__}, not a state_dict; accepted: a dict of "
                           f"tensors, or a dict with a `state_dict` entry.")
    sd = _select(obj, key, notes)
    bad = [(k, type(v).__name__) for k, v in sd.items() if not _is_array(v)]
    if bad:
        raise ConvertError(f"The state_dict has non-tensor entries (key, type): {bad[:5]}; accepted: tensors "
                           f"only.")
    sd = _strip(OrderedDict(sd), strip_prefix, notes, allow_partial)
    if any(k.startswith(("decode_head.", "backbone.", "auxiliary_head.")) for k in sd):
        weights, hints = import_mmseg(sd, notes, allow_partial)
        return weights, hints, notes
    check_recognisable(sd)
    return sd, {}, notes


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


def import_mmseg(sd, notes: list, allow_partial: bool = False):
    """mmseg DANet names -> ours; ``(weights, hints)``; what was done is appended to ``notes``.

    A backbone that does not fit DANet's deep-stem ResNet is refused, unless
    ``allow_partial``: then the head alone is imported and the note says so.
    """
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
                "danet", num_classes=num_classes, backbone=depth, deep_stem=True, multi_grid=None)).items()
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
                         "-> pretrained.conv1.*, stem.7 -> pretrained.bn1); mmseg's DANet uses contract dilation, "
                         "which is the official backbone without multi-grid (multi_grid=None, set here); only "
                         "its final resize differs (align_corners=False in mmseg)")
            out = OrderedDict(list(backbone.items()) + [("head." + k, v) for k, v in head.items()])
            for k in other:
                out[k] = sd[k]
            return out, {"kind": "danet", "deep_stem": True, "backbone": depth, "multi_grid": None}
        stem = [tuple(sd[k].shape[:2]) for k in ("backbone.stem.0.weight", "backbone.stem.3.weight",
                                                 "backbone.stem.6.weight") if k in sd]
        why = (f"mmseg's backbone does not match DANet's deep-stem ResNet ({mismatch}; mmseg stem convs "
               f"(out, in) {stem}, ours (64, 3), (64, 64), (128, 64))")
        if not allow_partial:
            raise ConvertError(f"{why}: refused, since the {len(backbone)} backbone tensors would be lost; pass "
                               f"--allow-partial to import the head alone (DANetHead).")
        notes.append(f"{why}: imported the head alone (DANetHead), left out {len(backbone)} backbone tensors")
    for k in other:
        head[k] = sd[k]
    return head, {"kind": "head"}
