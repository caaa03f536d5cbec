"""The one name table torch state_dict name -> Keras weight path, and the layout rules.

The table is mechanical (docs/ARCHITECTURE.md, "the mirror rule"): the Keras
model mirrors the torch module tree, so a torch key resolves on the Keras
model by walking its dotted path (a name is ``getattr``, a number is
``.layers[i]`` of a ``keras.Sequential``); the last part names the variable
through :data:`LEAF_RULES`.

``python -m weights_convert.mapping --markdown > docs/WEIGHT_MAP.md`` renders it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .arch import ArchSpec, expected_shapes

__all__ = ["Row", "LEAF_RULES", "RULES", "leaf_kind", "keras_path", "keras_table", "to_keras_layout",
           "from_keras_layout", "inverse_axes", "resolve_keras", "markdown"]

# rule name -> (torch -> Keras transpose axes or None, the torch dtype restored on the way back or None, description)
RULES = {
    "conv_kernel": ((2, 3, 1, 0), None,
                    "Conv2d weight OIHW -> Keras kernel HWIO: transpose (2, 3, 1, 0); back (3, 2, 0, 1)"),
    "identity": (None, None, "identity (same shape and values)"),
    "int64": (None, "int64", "identity; Keras may hold it as int32, restored to int64 on the way back"),
}
# (leaf kind, torch parameter) -> (Keras variable, rule)
LEAF_RULES = {
    ("conv", "weight"): ("kernel", "conv_kernel"),
    ("conv", "bias"): ("bias", "identity"),
    ("batchnorm", "weight"): ("gamma", "identity"),
    ("batchnorm", "bias"): ("beta", "identity"),
    ("batchnorm", "running_mean"): ("moving_mean", "identity"),
    ("batchnorm", "running_var"): ("moving_variance", "identity"),
    ("batchnorm", "num_batches_tracked"): ("num_batches_tracked", "int64"),
    ("attention", "gamma"): ("gamma", "identity"),
}
LEAF_CLASSES = {"conv": ("nn.Conv2d", "Conv2d"), "batchnorm": ("nn.BatchNorm2d", "BatchNorm"),
                "attention": ("PositionAttention / ChannelAttention", "PositionAttention / ChannelAttention")}


@dataclass(frozen=True)
class Row:
    torch_name: str
    keras_path: str
    rule: str
    kind: str
    torch_shape: tuple
    keras_shape: tuple


def leaf_kind(name: str, shapes: Mapping[str, tuple]) -> str:
    """``"conv"``, ``"batchnorm"`` or ``"attention"`` for torch key ``name``, from the key set alone."""
    prefix, _, param = name.rpartition(".")
    pre = f"{prefix}." if prefix else ""
    if param == "gamma":
        return "attention"
    if f"{pre}running_mean" in shapes:
        return "batchnorm"
    if param in ("weight", "bias") and len(shapes.get(f"{pre}weight", ())) == 4:
        return "conv"
    raise ValueError(f"No layout rule for the key {name!r} (shape {shapes.get(name)}); known leaves: "
                     f"{sorted(set(k for k, _ in LEAF_RULES))}.")


def keras_path(name: str, kind: str) -> str:
    parts = name.split(".")
    var = LEAF_RULES[(kind, parts[-1])][0]
    walk = "".join(f".layers[{p}]" if p.isdigit() else f".{p}" for p in parts[:-1])
    return f"{walk.lstrip('.')}.{var}" if walk else var


def inverse_axes(axes):
    """The transpose that undoes ``axes``."""
    return tuple(int(a) for a in np.argsort(axes))


def _keras_shape(shape, rule):
    axes = RULES[rule][0]
    return tuple(shape[a] for a in axes) if axes else tuple(shape)


def keras_table(spec_or_shapes) -> list:
    """The table rows for an :class:`ArchSpec` (or a ``{torch name: shape}`` mapping)."""
    shapes = expected_shapes(spec_or_shapes) if isinstance(spec_or_shapes, ArchSpec) else \
        {k: tuple(getattr(v, "shape", v)) for k, v in spec_or_shapes.items()}
    rows = []
    for name, shape in shapes.items():
        kind = leaf_kind(name, shapes)
        var, rule = LEAF_RULES[(kind, name.rpartition(".")[2])]
        rows.append(Row(name, keras_path(name, kind), rule, kind, tuple(shape), _keras_shape(shape, rule)))
    return rows


def to_keras_layout(array: np.ndarray, rule: str) -> np.ndarray:
    axes = RULES[rule][0]
    return np.ascontiguousarray(np.transpose(array, axes)) if axes else np.asarray(array)


def from_keras_layout(array: np.ndarray, rule: str) -> np.ndarray:
    """The inverse of :func:`to_keras_layout`, derived from the same rule."""
    axes, dtype, _ = RULES[rule]
    array = np.asarray(array)
    if axes is not None:
        array = np.ascontiguousarray(np.transpose(array, inverse_axes(axes)))
    return array.astype(dtype) if dtype is not None else array


def resolve_keras(model, path: str):
    """The Keras variable at ``path`` (``"head.conv5a.layers[0].kernel"``) on ``model``."""
    obj = model
    done = []
    for part in path.split("."):
        try:
            if part.startswith("layers["):
                obj = obj.layers[int(part[7:-1])]
            else:
                obj = getattr(obj, part)
        except (AttributeError, IndexError) as e:
            where = ".".join(done) or type(model).__name__
            raise AttributeError(f"Keras model has no `{part}` under `{where}` (resolving {path!r}): {e}") from e
        done.append(part)
    return obj


def markdown(specs=None) -> str:
    """The weight map as Markdown: the leaf rules, then generated tables."""
    if specs is None:
        specs = [("DANetHead(in_channels=2048, num_classes=19)", ArchSpec("head", in_channels=2048, num_classes=19), None),
                 ("DANet-101 (7x7 stem), backbone first blocks", ArchSpec("danet", num_classes=19),
                  lambda r: r.torch_name.startswith(("pretrained.conv1", "pretrained.bn1", "pretrained.layer1.0.",
                                                     "pretrained.layer3.22."))),
                 ("DANet deep stem: the stem", ArchSpec("danet", num_classes=19, deep_stem=True),
                  lambda r: r.torch_name.startswith(("pretrained.conv1", "pretrained.bn1")))]
    out = ["# Weight map: PyTorch state_dict <-> Keras", "",
           "Generated by `python -m weights_convert.mapping --markdown > docs/WEIGHT_MAP.md`; do not edit by hand.",
           "", "A torch key resolves on the Keras model by walking its dotted path: a name is `getattr`, "
           "a number is `.layers[i]` of a `keras.Sequential`; the last part names the variable:", "",
           "| torch leaf | torch parameter | Keras layer | Keras variable | rule |", "|---|---|---|---|---|"]
    for (kind, param), (var, rule) in LEAF_RULES.items():
        t, k = LEAF_CLASSES[kind]
        out.append(f"| `{t}` | `{param}` | `{k}` | `{var}` | {RULES[rule][2]} |")
    for title, spec, keep in specs:
        rows = [r for r in keras_table(spec) if keep is None or keep(r)]
        total = len(keras_table(spec))
        out += ["", f"## {title}", "", f"{len(rows)} of {total} tensors.", "",
                "| torch name | torch shape | Keras weight path | Keras shape | rule |", "|---|---|---|---|---|"]
        out += [f"| `{r.torch_name}` | {r.torch_shape} | `{r.keras_path}` | {r.keras_shape} | {r.rule} |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the torch <-> Keras weight map.")
    parser.add_argument("--markdown", action="store_true", help="Markdown (docs/WEIGHT_MAP.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        for r in keras_table(ArchSpec("head", in_channels=2048, num_classes=19)):
            print(f"{r.torch_name}\t{r.keras_path}\t{r.rule}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
