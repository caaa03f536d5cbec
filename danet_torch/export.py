"""Export ``danet_torch`` modules to ONNX with dynamic batch, height and width.

The ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``,
translated by ``onnxscript``) is tried first; if it fails, the legacy
TorchScript exporter (``dynamo=False`` with ``dynamic_axes``) is used. PAM
takes its official path while exporting (:func:`danet_torch.pam.is_exporting`),
so the graph holds the official ``bmm`` + softmax, valid at any size. DANet's
final ``F.interpolate`` to the input size stays symbolic, so an ONNX file
exported at one size runs at others.

Usage::

    from danet_torch.export import export_onnx, to_onnx
    model, used = to_onnx(head, torch.randn(2, 512, 33, 33))     # onnx.ModelProto, in memory
    export_onnx(head, "head.onnx", torch.randn(2, 512, 33, 33))  # the same, saved

Files are written by ``danet-convert`` (atomically, never over an existing
file without ``--force``), or by :func:`export_onnx`.

Not imported by ``import danet_torch``: import ``danet_torch.export``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

__all__ = ["to_onnx", "export_onnx", "output_names", "INPUT_NAME", "DYNAMIC_AXES"]

INPUT_NAME = "input"
# The input's dynamic axes (the legacy exporter's names; dynamo names them itself); outputs keep them.
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
MULTI_OUTPUT_NAMES = ("fused", "pam", "cam")
LEGACY_OPSET = 17
EXPORTERS = ("auto", "dynamo", "legacy")


def output_names(module: torch.nn.Module) -> list[str]:
    """``["fused", "pam", "cam"]`` for ``DANetHead``/``DANet`` (three outputs), else ``["output"]``."""
    from .head import DANetHead
    from .model import DANet

    return list(MULTI_OUTPUT_NAMES) if isinstance(module, (DANetHead, DANet)) else ["output"]


def _check_example(example_input, dynamic: bool) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"`example_input` must be a torch.Tensor (B, C, H, W), got {type(example_input).__name__}.")
    if example_input.dim() != 4 or not example_input.is_floating_point():
        raise ValueError(f"`example_input` must be a 4-D floating tensor (B, C, H, W), got shape "
                         f"{tuple(example_input.shape)} and dtype {example_input.dtype}.")
    if dynamic and min(example_input.shape[2:]) < 2:
        raise ValueError(f"`example_input` must have height and width >= 2 for a dynamic export (a size of 1 "
                         f"is specialised by torch.export), got shape {tuple(example_input.shape)}.")
    if dynamic and example_input.shape[0] == 1:  # batch 1 would be specialised: trace with batch 2
        example_input = torch.cat([example_input, example_input])
    return example_input


def _export_dynamo(module, x, dynamic, opset, names):
    dim = torch.export.Dim.DYNAMIC
    shapes = ({a: dim for a in DYNAMIC_AXES},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=names, external_data=False,
                                    optimize=True, verbose=False)
    return program.model_proto


def _export_legacy(module, x, dynamic, opset, names) -> bytes:
    axes = None
    if dynamic:
        axes = {INPUT_NAME: dict(DYNAMIC_AXES)}
        axes.update({n: dict(DYNAMIC_AXES) for n in names})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=opset or LEGACY_OPSET,
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes,
                          do_constant_folding=True)
    return buffer.getvalue()


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def to_onnx(module: torch.nn.Module, example_input: torch.Tensor, dynamic: bool = True, opset: int | None = None,
            exporter: str = "auto"):
    """Export ``module`` to an in-memory ONNX model; return ``(onnx.ModelProto, exporter used)``.

    Args:
        module: A ``danet_torch`` module (PAM, CAM, DualAttention, DANetHead,
            DANet) or any module with one ``(B, C, H, W)`` input. Exported in
            eval mode (BatchNorm running statistics, no dropout); its
            training flag is restored afterwards.
        example_input: ``(B, C, H, W)`` tensor to trace with. With
            ``dynamic``, batch 1 is traced as batch 2 (torch.export would
            otherwise fix the batch to 1) and height/width must be >= 2.
        dynamic: Batch, height and width dynamic (the legacy exporter names
            the axes ``batch``, ``height``, ``width``; the dynamo exporter
            its own symbols, such as ``s77``); otherwise the example's shape
            is fixed.
        opset: ONNX opset (default: the exporter's; 17 for the legacy one).
        exporter: ``"auto"`` (``torch.export``-based, legacy on failure),
            ``"dynamo"`` or ``"legacy"``.

    Returns:
        ``(model, "dynamo" | "legacy")``. The input is named ``"input"``;
        outputs are ``"fused", "pam", "cam"`` for DANetHead/DANet, else ``"output"``.

    Raises:
        TypeError, ValueError: bad arguments. RuntimeError: both exporters failed
        (the message holds both errors).
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"`exporter` must be one of {list(EXPORTERS)}, got {exporter!r}.")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    x = _check_example(example_input, dynamic)
    names = output_names(module)
    order = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    errors = []
    with _eval_mode(module), torch.no_grad():
        for name in order:
            try:
                if name == "dynamo":
                    return _export_dynamo(module, x, dynamic, opset, names), name
                return onnx.load_from_string(_export_legacy(module, x, dynamic, opset, names)), name
            except Exception as e:  # the exporters raise many types; the next one may succeed
                errors.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
                if name == "dynamo" and len(order) > 1:
                    warnings.warn(f"torch.export-based ONNX export failed ({errors[-1]}); "
                                  f"falling back to the legacy exporter.", RuntimeWarning, stacklevel=2)
    raise RuntimeError(f"ONNX export of {type(module).__name__} failed. " + "; ".join(errors))


def export_onnx(module: torch.nn.Module, path, example_input: torch.Tensor, **kwargs) -> str:
    """:func:`to_onnx`, saved to ``path`` (``.onnx``); return the exporter used.

    Written atomically: to a temporary file beside ``path``, renamed into
    place, so that a failed export or write leaves nothing new and an existing
    ``path`` as it was (a successful one replaces it, as ``torch.onnx.export``
    does; ``danet-convert WEIGHTS MODEL.onnx`` refuses without ``--force``).
    """
    import onnx

    from weights_convert.atomic import atomic_target

    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"`path` must end in .onnx, got {str(path)!r}.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder of `path` {str(path)!r} does not exist.")
    model, used = to_onnx(module, example_input, **kwargs)
    with atomic_target(path, ".onnx") as tmp:
        onnx.save(model, str(tmp))
    return used
