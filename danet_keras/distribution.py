"""Training on several devices: which BatchNorm statistics each Keras distribution engine gives, and the switch.

* JAX, ``keras.distribution.DataParallel``: one program over the global
  batch (sharded across devices); BatchNorm statistics are global, so a step
  equals one device on the whole batch with no setting.
* TensorFlow, ``tf.distribute.MirroredStrategy``: each replica runs the model
  on its part of the batch; :class:`~danet_keras.layers.BatchNorm` normalises
  with per-replica statistics (and the moving averages keep the first
  replica's), unless synchronized: :func:`sync_batchnorm` switches every
  BatchNorm of a model to global statistics (``torch.nn.SyncBatchNorm``'s
  behaviour), so a step on N replicas equals one device.
"""

from __future__ import annotations

from .layers import BatchNorm

__all__ = ["sync_batchnorm"]


def sync_batchnorm(model, synchronized: bool = True) -> int:
    """Set ``synchronized`` on every :class:`~danet_keras.layers.BatchNorm` of a built ``model``; returns how many.

    A training-time switch (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``'s
    role): DANet rebuilds its layers from its own config, so a reloaded model
    needs it again. Call it before ``compile``/``fit`` (the first traced step
    fixes the behaviour).
    """
    if synchronized not in (True, False):
        raise ValueError(f"`synchronized` must be True or False, got {synchronized!r}.")
    if not getattr(model, "built", False):
        raise ValueError("`model` is not built: call it once or `model.build(input_shape)` first, so that its "
                         "BatchNorm layers exist.")
    layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
              if isinstance(layer, BatchNorm)]
    for layer in layers:
        layer.synchronized = bool(synchronized)
    return len(layers)
