"""Gradients of a Keras model on whichever backend is running.

Keras 3 has no backend-neutral gradient call, so this is the one place that
speaks each backend: TensorFlow's ``GradientTape``, JAX's ``value_and_grad``
over ``stateless_call`` (then the updated BatchNorm statistics are written
back), and torch autograd.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np

__all__ = ["keras_loss_and_grads"]


def _loss(outputs, weights):
    """``sum_i <out_i, w_i>`` in float64 for float64 outputs, else float32 (half outputs upcast)."""
    ops = keras.ops
    total = 0
    for o, w in zip(outputs, weights):
        dtype = "float64" if keras.backend.standardize_dtype(o.dtype) == "float64" else "float32"
        total = total + ops.sum(ops.cast(o, dtype) * ops.convert_to_tensor(w, dtype))
    return total


def _as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def keras_loss_and_grads(model, x: np.ndarray, weights, training: bool = True):
    """``(outputs, d loss / d x, {id(variable): gradient})`` for ``loss = sum_i <out_i, w_i>``.

    In training mode BatchNorm uses batch statistics and updates its moving
    statistics in place, on every backend.
    """
    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            outputs = _as_tuple(model(xt, training=training))
            loss = _loss(outputs, weights)
        grads = tape.gradient(loss, [xt] + list(variables))
    elif backend == "jax":
        import jax

        trainable = [v.value for v in variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        kwargs = {"training": training} if "training" in inspect.signature(model.call).parameters else {}

        def fn(tv, xv):
            outputs, new_nt = model.stateless_call(tv, non_trainable, xv, **kwargs)
            return _loss(_as_tuple(outputs), weights), (_as_tuple(outputs), new_nt)

        grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
        (_, (outputs, new_nt)), (g_vars, g_x) = grad_fn(trainable, jax.numpy.asarray(x))
        for var, value in zip(model.non_trainable_variables, new_nt):
            var.assign(value)
        grads = [g_x] + list(g_vars)
    elif backend == "torch":
        xt = keras.ops.convert_to_tensor(x, dtype=str(x.dtype)).detach().clone().requires_grad_(True)
        for v in variables:
            v.value.grad = None
        outputs = _as_tuple(model(xt, training=training))
        _loss(outputs, weights).backward()
        grads = [xt.grad] + [v.value.grad for v in variables]
    else:  # pragma: no cover - Keras has no other backend with gradients
        raise ValueError(f"Keras backend {backend!r} is not supported; use tensorflow, jax or torch.")
    to_np = keras.ops.convert_to_numpy
    outputs = [np.asarray(to_np(o)) for o in outputs]
    var_grads = {id(v): (None if g is None else np.asarray(to_np(g))) for v, g in zip(variables, grads[1:])}
    return outputs, np.asarray(to_np(grads[0])), var_grads
