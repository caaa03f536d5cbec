"""danet_torch.evaluate: precise BatchNorm statistics against NumPy, whole-image evaluation."""

from __future__ import annotations

import numpy as np
import torch

from danet_torch.distributed import DistContext
from danet_torch.evaluate import evaluate, precise_bn
from parity_tests.tests.helpers import check


def test_precise_bn_is_the_average_of_batch_statistics(rng):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, bias=False), torch.nn.BatchNorm2d(3),
                                torch.nn.Dropout2d(0.5)).double()
    model[1].num_batches_tracked.fill_(17)
    batches = [(torch.from_numpy(rng.normal(i, 1 + i, (2, 2, 4, 5))), None) for i in range(4)]
    assert precise_bn(model, batches, 3, "cpu", torch.float64) == 3
    w = model[0].weight.detach().numpy()[:, :, 0, 0]
    feats = [np.einsum("oc,bchw->bohw", w, x.numpy()) for x, _ in batches[:3]]
    means = [f.mean(axis=(0, 2, 3)) for f in feats]
    variances = [f.var(axis=(0, 2, 3), ddof=1) for f in feats]  # BatchNorm keeps the unbiased variance
    check("running_mean", model[1].running_mean.numpy(), np.mean(means, axis=0), dtype="float64")
    check("running_var", model[1].running_var.numpy(), np.mean(variances, axis=0), dtype="float64")
    assert int(model[1].num_batches_tracked) == 17 and model[1].momentum == 0.1


def test_evaluate_counts_whole_images():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # predicts class 1 everywhere
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:]) + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
            return logits, logits, logits

    data = [(np.zeros((3, 2, 2), np.float32), np.array([[0, 1], [1, 255]])) for _ in range(3)]
    whole = evaluate(Constant(), data, DistContext(), 2)
    assert whole["iou"] == [0.0, 2 / 3] and whole["pixel_acc"] == 2 / 3 and whole["miou"] == 1 / 3
