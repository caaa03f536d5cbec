"""Shared testers, run on every layer and module (the idea of keras-hub's ``run_layer_test`` and smp's base tester).

:func:`run_keras_layer_test` checks a Keras layer the way users meet it:
config round trip through the registry, a symbolic call with ``None``
sizes, an eager call at odd sizes against ``compute_output_shape``, the
expected trainable and non-trainable weight counts, a training step (every
trainable weight gets a finite gradient, BatchNorm statistics move), every
sublayer's dtype policy under mixed precision, and a ``.keras`` reload that
gives the same outputs bit for bit.

:func:`run_torch_module_test` does the same for a torch module: forward at
odd sizes, backward (every parameter gets a finite gradient), a state_dict
save/load through ``torch.load(weights_only=True)`` (bit-exact outputs),
``torch.compile`` and ``torch.export`` against eager within the table's
tolerance.

Values (a layer's numbers against a reference) are the other test files'
job; these testers check the contract every layer owes its users.
"""

from __future__ import annotations

import inspect

import numpy as np

from parity_tests.keras_grad import keras_loss_and_grads
from weights_convert.tolerances import compare, tolerance

__all__ = ["run_keras_layer_test", "run_torch_module_test"]


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _call(layer, x, training=None):
    takes = "training" in inspect.signature(layer.call).parameters
    return layer(x, training=training) if takes else layer(x)


def run_keras_layer_test(cls, init_kwargs: dict, input_shape: tuple, *, expected_output_shapes,
                         expected_trainable: int, expected_non_trainable: int, tmp_path=None,
                         mixed_precision: bool = True, training_step: bool = True, seed: int = 0) -> None:
    """Check ``cls(**init_kwargs)`` on an input of ``input_shape`` (concrete, channels last unless the kwargs say).

    Args:
        expected_output_shapes: One shape per output, for ``input_shape``.
        expected_trainable, expected_non_trainable: Weight counts once built.
        tmp_path: A folder for the ``.keras`` reload (skipped if ``None``).
        training_step: Check a training step (skip only where a larger layer's
            check runs the same sublayers' step).
    """
    import keras

    # Config round trip, through the registry.
    layer = cls(**init_kwargs)
    config = layer.get_config()
    for key, value in init_kwargs.items():  # Keras may store an int as (int, int)
        assert np.all(np.asarray(config[key]) == np.asarray(value)), (key, config[key], value)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is cls and clone.get_config() == config

    # Symbolic call: None batch and spatial sizes give the expected shapes with None in them.
    first = init_kwargs.get("data_format") == "channels_first"
    symbolic = (input_shape[1], None, None) if first else (None, None, input_shape[-1])
    inp = keras.Input(symbolic)
    outs = _tuple(_call(cls(**init_kwargs), inp))
    expected = [tuple(s) for s in expected_output_shapes]
    spatial = (2, 3) if first else (1, 2)
    assert [tuple(o.shape) for o in outs] == [tuple(None if i == 0 or i in spatial else d for i, d in enumerate(s))
                                             for s in expected]

    # Eager call at the given (odd) size, against compute_output_shape and the expectation.
    x = np.random.default_rng(seed).normal(0, 0.5, input_shape).astype("float32")
    layer = cls(**init_kwargs)
    ys = _tuple(_call(layer, x, training=False))
    assert [tuple(y.shape) for y in ys] == expected
    computed = layer.compute_output_shape(input_shape)
    computed = computed if isinstance(computed[0], (tuple, list)) else (computed,)
    assert [tuple(c) for c in computed] == expected
    assert (len(layer.trainable_weights), len(layer.non_trainable_weights)) == (expected_trainable,
                                                                                expected_non_trainable)

    if training_step:
        _check_training_step(layer, x, expected, seed)
    if mixed_precision:
        _check_mixed_precision(cls, init_kwargs, x, expected)
    if tmp_path is not None:
        _check_reload(layer, inp.shape, x, tmp_path / f"{cls.__name__}.keras")


def _check_training_step(layer, x, expected, seed):
    """Every trainable weight gets a finite gradient; BatchNorm statistics move."""
    import keras

    stats = {id(v): np.array(keras.ops.convert_to_numpy(v)) for v in layer.non_trainable_weights}
    weights = [np.random.default_rng(seed + 1).standard_normal(e) for e in expected]
    _, dx, grads = keras_loss_and_grads(layer, x, weights, training=True)
    assert np.isfinite(dx).all()
    for v in layer.trainable_weights:
        g = grads.get(id(v))
        assert g is not None and np.isfinite(g).all(), f"{v.path}: no finite gradient"
    for v in layer.non_trainable_weights:
        assert not np.array_equal(stats[id(v)], keras.ops.convert_to_numpy(v)), f"{v.path} did not move"


def _check_mixed_precision(cls, init_kwargs, x, expected):
    import keras

    for policy in ("mixed_float16", "mixed_bfloat16"):
        layer = cls(**init_kwargs, dtype=policy)
        ys = _tuple(_call(layer, x, training=False))
        compute = policy.split("_")[1]
        assert [keras.backend.standardize_dtype(y.dtype) for y in ys] == [compute] * len(expected)
        assert all(np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))).all() for y in ys)
        for sub in layer._flatten_layers(include_self=True):
            if isinstance(sub, keras.layers.InputLayer):  # a keras.Sequential's placeholder: computes nothing
                continue
            assert sub.dtype_policy.name == policy, f"{sub.name}: {sub.dtype_policy.name} under {policy}"
        assert all(v.dtype == "float32" for v in layer.trainable_weights)


def _check_reload(layer, input_shape, x, path):
    import keras

    inp = keras.Input(tuple(input_shape[1:]))
    model = keras.Model(inp, _call(layer, inp, training=False))
    want = [keras.ops.convert_to_numpy(y) for y in _tuple(model(x, training=False))]
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    got = [keras.ops.convert_to_numpy(y) for y in _tuple(again(x, training=False))]
    assert all(np.array_equal(w, g) for w, g in zip(want, got))


def run_torch_module_test(make, input_shape: tuple, *, expected_output_shapes, tmp_path, seed: int = 0,
                          compile_and_export: bool = True) -> None:
    """Check the module ``make()`` (random weights, eval mode) on an input of ``input_shape``."""
    import torch

    module = make()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = _tuple(module(x))
    assert [tuple(y.shape) for y in want] == [tuple(s) for s in expected_output_shapes]

    # Backward in training mode: every parameter gets a finite gradient.
    module.train()
    xg = x.clone().requires_grad_(True)
    sum((y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))).sum()
        for y in _tuple(module(xg))).backward()
    module.eval()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no finite gradient"

    # Save and load the state_dict (BatchNorm statistics moved by the step) without pickled code: bit-exact.
    with torch.no_grad():
        want = _tuple(module(x))
    torch.save(module.state_dict(), tmp_path / "m.pth")
    again = make()
    again.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    again.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(want, _tuple(again(x))))
    if not compile_and_export:
        return
    tol = tolerance("float32", "layer")
    with torch.no_grad():
        compiled = _tuple(torch.compile(module, backend="aot_eager", dynamic=False)(x))
        exported = _tuple(torch.export.export(module, (x,)).module()(x))
    for label, got in (("torch.compile", compiled), ("torch.export", exported)):
        for i, (g, w) in enumerate(zip(got, want)):
            c = compare(f"{type(module).__name__} {label} output {i}", g.numpy(), w.numpy(), tol)
            assert c.passed, c.message()
