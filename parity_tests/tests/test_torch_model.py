"""danet_torch.model and backbone: official layout, parameter counts, dilations, output sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet_torch import DANet, DilatedResNet, danet_loss
from parity_tests import reference as ref
from weights_convert.testing import randomize_
from parity_tests.tests.helpers import to_numpy
from parity_tests.tests.official_keys import danet_keys
from weights_convert.tolerances import compare, tolerance


@pytest.mark.parametrize("backbone, depth, n_keys, n_params", [
    ("resnet101", 101, 662, 66_454_779),
    ("resnet50", 50, 356, 47_462_651),
])
def test_state_dict_is_upstreams(backbone, depth, n_keys, n_params):
    model = DANet(19, backbone=backbone)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == n_keys
    assert sorted(got) == sorted(danet_keys(19, depth))
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not any(k.startswith("pretrained.fc") for k, _ in got)


def test_deep_stem_keys():
    model = DANet(7, backbone="resnet50", deep_stem=True)
    got = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    assert got == sorted(danet_keys(7, 50, deep_stem=True))


def _conv2_dilations(layer):
    return [(b.conv2.stride[0], b.conv2.dilation[0], b.conv2.padding[0]) for b in layer]


def test_dilations_follow_the_official_rules():
    net = DilatedResNet(101, output_stride=8, multi_grid=(4, 8, 16))
    assert _conv2_dilations(net.layer3) == [(1, 1, 1)] + [(1, 2, 2)] * 22
    assert _conv2_dilations(net.layer4) == [(1, 4, 4), (1, 8, 8), (1, 16, 16)]
    net = DilatedResNet(50, output_stride=8, multi_grid=None)
    assert _conv2_dilations(net.layer4) == [(1, 2, 2), (1, 4, 4), (1, 4, 4)]
    net = DilatedResNet(50, output_stride=16, multi_grid=None)
    assert _conv2_dilations(net.layer3)[0] == (2, 1, 1)
    assert _conv2_dilations(net.layer4) == [(1, 1, 1), (1, 2, 2), (1, 2, 2)]


@pytest.mark.parametrize("output_stride, size, feat", [(8, (65, 65), (9, 9)), (16, (97, 129), (7, 9))])
def test_backbone_output_stride(output_stride, size, feat):
    net = DilatedResNet(50, output_stride=output_stride).eval()
    with torch.no_grad():
        c4 = net(torch.randn(1, 3, *size))[-1]
    assert c4.shape == (1, 2048, *feat)


@pytest.mark.parametrize("backbone, size", [("resnet101", (65, 65)), ("resnet50", (97, 129))])
def test_outputs_are_head_logits_upsampled_with_align_corners(backbone, size):
    model = randomize_(DANet(4, backbone=backbone), seed=5).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        outputs = model(x)
        head_out = model.head(model.pretrained(x)[-1])
    assert len(outputs) == 3
    for name, got, small in zip(("fused", "pam", "cam"), outputs, head_out):
        assert got.shape == (1, 4, *size)
        expected = ref.resize_bilinear_align_corners(to_numpy(small), size)
        result = compare(f"DANet {name}", to_numpy(got), expected, tolerance("float32"))
        assert result.passed, result.message()


def _cross_entropy_numpy(logits, target, ignore_index=-1):
    """Mean cross-entropy over the pixels whose label is not ``ignore_index``, float64."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    keep = target != ignore_index
    picked = np.take_along_axis(log_p, np.where(keep, target, 0)[:, None], axis=1)[:, 0]
    return -picked[keep].mean()


def test_training_step_and_loss():
    model = DANet(3, backbone="resnet50", output_stride=16, multi_grid=None)
    x = torch.randn(2, 3, 33, 33)
    target = torch.randint(0, 3, (2, 33, 33))
    target[:, :5] = -1  # upstream's ignore label
    outputs = model(x)
    loss = danet_loss(outputs, target)
    expected = sum(_cross_entropy_numpy(to_numpy(o), target.numpy()) for o in outputs)
    result = compare("danet_loss", to_numpy(loss), np.array(expected), tolerance("float32", "model"))
    assert result.passed, result.message()
    loss.backward()
    assert model.head.sa.gamma.grad.abs().item() > 0
    assert model.pretrained.conv1.weight.grad.abs().sum().item() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=0), r"`num_classes` must be an int >= 1, got 0"),
    (dict(num_classes=3, backbone="resnet18"), r"`backbone` must be one of \['resnet101', 'resnet50'\], got 'resnet18'"),
    (dict(num_classes=3, output_stride=4), r"`output_stride` must be 8, 16 or 32, got 4"),
    (dict(num_classes=3, multi_grid=(1, 2)), r"`multi_grid` must give one dilation >= 1 per layer4 block \(3\)"),
    (dict(num_classes=3, multi_grid="124"), r"`multi_grid` must be a sequence of ints >= 1 or None, got '124'"),
    (dict(num_classes=3, multi_grid=4), r"`multi_grid` must be a sequence of ints >= 1 or None, got 4"),
    (dict(num_classes=3, multi_grid=(4, 8.5, 16)), r"`multi_grid` must be .* got \(4, 8.5, 16\)"),
    (dict(num_classes=3, deep_stem="no"), r"`deep_stem` must be True or False, got 'no'"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DANet(**kwargs)


def test_model_rejects_non_rgb_input():
    with pytest.raises(ValueError, match=r"DANet: `x` has 1 channels .* in_channels=3"):
        DANet(3, backbone="resnet50")(torch.zeros(1, 1, 16, 16))


def test_the_readmes_pytorch_example_runs_the_checkpoint_in_eval_mode(tmp_path, monkeypatch):
    """README's PyTorch block, run as written on a stand-in for the released checkpoint (its input 65 x 65, not 769).

    It called the loaded model in training mode: BatchNorm normalised with the
    batch's statistics and overwrote the checkpoint's running ones, dropout
    was on. Its outputs must be the eval-mode model's, its statistics the file's.
    """
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not beside the installed package (installed without the source tree)")
    example = readme.read_text().split("PyTorch:\n\n```python\n", 1)[1].split("```", 1)[0]
    sd = randomize_(DANet(19), seed=1).state_dict()
    torch.save({"epoch": 240, "state_dict": sd}, tmp_path / "danet101.pth")
    monkeypatch.chdir(tmp_path)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    scope = {"x": x}
    assert "torch.randn(1, 3, 769, 769)" in example
    exec(example.replace("torch.randn(1, 3, 769, 769)", "x"), scope)
    reference = DANet(19)
    reference.load_state_dict(sd)
    with torch.no_grad():
        expected = reference.eval()(x)
    for name, got, want in zip(("fused", "pam", "cam"), (scope["fused"], scope["pam"], scope["cam"]), expected):
        c = compare(f"README {name}", to_numpy(got), to_numpy(want), tolerance("float32", "model"))
        assert c.passed, c
    state = scope["model"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in sd.items()), "the example changed the checkpoint's statistics"
