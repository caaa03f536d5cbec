"""DDP + SyncBatchNorm on CPU (gloo): two processes equal one process on the concatenated batch.

danet_torch.distributed.wrap_model (SyncBatchNorm + DistributedDataParallel) and
danet_torch.sync_batchnorm, in float64: the gradients after one step and the
BatchNorm running statistics of a 2-process run equal those of one process
on both halves of the batch at once; then the ``danet-train`` command itself
under ``torchrun --nproc_per_node 2`` against one process with twice the batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from danet_torch import DANet
from danet_torch.distributed import init_distributed, shutdown, unwrap, wrap_model
from danet_torch.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from danet_torch.train import _loss
from parity_tests.tests.helpers import check, make_segmentation_folder
from weights_convert.testing import randomize_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    model = DANet(3, backbone="resnet50", output_stride=16, multi_grid=None, dropout=0.0).double()
    return randomize_(model, seed=0).train()


def _worker(rank, world, port, out, x, y):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        net = wrap_model(_model(), ctx)
        half = x.shape[0] // world
        _loss(net(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]).backward()
        model = unwrap(net)
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()},
                    "buffers": dict(model.named_buffers()),
                    "sync": sum(isinstance(m, SyncBatchNorm) for m in model.modules())}, f"{out}/rank{rank}.pt")
    finally:
        shutdown(ctx)


def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 3, 32, 32)))
    y = torch.from_numpy(rng.integers(0, 3, (2, 32, 32)))  # no ignored pixels: equal counts on both ranks
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path), x, y), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = _model()
    _loss(reference(x), y).backward()
    assert ranks[0]["sync"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules()) == 57
    for name, p in reference.named_parameters():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        check(f"grad {name}", ranks[0]["grads"][name].numpy(), p.grad.numpy(), dtype="float64", scope="grad")
    for name, b in reference.named_buffers():
        got = ranks[0]["buffers"][name]
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(b), name
        else:
            check(f"buffer {name}", got.numpy(), b.numpy(), dtype="float64", scope="layer")


def test_convert_keeps_parameters_and_one_process_is_plain_batchnorm():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    assert list(converted.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())
    bn, sync = torch.nn.BatchNorm2d(4).double(), convert_sync_batchnorm(torch.nn.BatchNorm2d(4).double())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(bn(x), sync(x)) and torch.equal(bn.running_var, sync.running_var)  # no process group


@pytest.mark.slow(reason="two torchrun processes and one plain run of the CLI: 35 s or more on 2 cores")
def test_danet_train_under_torchrun_equals_one_process(tmp_path):
    data = make_segmentation_folder(tmp_path / "ds", 4, size=32, block=16, seed=1)
    common = ["--data", str(data), "--num-classes", "3", "--backbone", "resnet50", "--crop", "32", "--epochs", "1",
              "--val-fraction", "0", "--workers", "0", "--dtype", "float64", "--dropout", "0", "--device", "cpu",
              "--scale-range", "1", "1"]  # no padding: every rank keeps as many pixels (DDP averages per-rank means)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "danet_torch.train", *common, "--batch-size", "1",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) on cpu (gloo)" in two.stdout and two.stdout.count("epoch 1/1: train loss") == 1
    one = subprocess.run([sys.executable, "-m", "danet_torch.train", *common, "--batch-size", "2",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 2
    for key, value in b["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            assert int(a["state_dict"][key]) == int(value) == 2, key
        else:
            check(key, a["state_dict"][key].numpy(), value.numpy(), dtype="float64", scope="model")
