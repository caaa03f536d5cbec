"""danet_torch.DANet(pretrained_backbone=..., in_channels=...): ImageNet ResNet weights in, the same features out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet_torch import DANet, DilatedResNet
from parity_tests.tests.helpers import check, imagenet_resnet_state_dict, reference_dilated_resnet
from weights_convert.errors import ConvertError

# The official DANet backbone at output stride 8 with multi-grid (4, 8, 16), written out for ResNet-50.
STAGES_OS8_MG = [(1, [1, 1, 1]), (2, [1, 1, 1, 1]), (1, [1, 2, 2, 2, 2, 2]), (1, [4, 8, 16])]
# Output stride 16, no multi-grid: layer3 stride 2, layer4 dilations 1, 2, 2.
STAGES_OS16 = [(1, [1, 1, 1]), (2, [1, 1, 1, 1]), (2, [1] * 6), (1, [1, 2, 2])]


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A torchvision-format ResNet-50 checkpoint (with fc) saved as .pth, and its tensors."""
    sd = imagenet_resnet_state_dict(np.random.default_rng(7), depth=50)
    path = tmp_path_factory.mktemp("imagenet") / "resnet50.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    return path, sd


@pytest.fixture(scope="module")
def imagenet_file64(tmp_path_factory):
    """The same in float64 as .safetensors: conv1 adapted in float64, so the channel checks are exact."""
    from safetensors.numpy import save_file

    sd = imagenet_resnet_state_dict(np.random.default_rng(8), depth=50, fc=False, dtype="float64")
    path = tmp_path_factory.mktemp("imagenet") / "resnet50.safetensors"
    save_file(sd, str(path))
    return path, sd


def _features(backbone, x):
    backbone = backbone.double().eval()
    with torch.no_grad():
        return [f.numpy() for f in backbone(torch.from_numpy(x))]


@pytest.mark.parametrize("output_stride, multi_grid, stages", [(8, (4, 8, 16), STAGES_OS8_MG),
                                                               (16, None, STAGES_OS16)])
def test_loaded_backbone_equals_file_and_reference_features(imagenet_file, output_stride, multi_grid, stages):
    path, sd = imagenet_file
    model = DANet(5, backbone="resnet50", output_stride=output_stride, multi_grid=multi_grid,
                  pretrained_backbone=str(path))
    state = model.pretrained.state_dict()
    assert set(state) == {k for k in sd if not k.startswith("fc.")}
    for key, value in state.items():
        assert value.dtype == torch.from_numpy(sd[key]).dtype and np.array_equal(value.numpy(), sd[key]), key
    assert any(n.startswith("ignored the ImageNet classifier") for n in model.backbone_notes), model.backbone_notes
    x = np.random.default_rng(0).normal(size=(2, 3, 40, 48))
    got = _features(model.pretrained, x)
    expected = reference_dilated_resnet(sd, x, stages)
    for i, (g, e) in enumerate(zip(got, expected), start=1):
        assert g.shape == e.shape
        check(f"c{i}", g, e, dtype="float64", scope="model")


def test_one_channel_input_sees_a_grey_image_as_rgb(imagenet_file64):
    """conv1 summed over RGB: features of a 1-channel image equal the RGB model's on the image repeated 3 times."""
    path, sd = imagenet_file64
    model = DANet(3, backbone="resnet50", in_channels=1).double()  # float64 before loading: no float32 rounding
    notes = model.load_pretrained_backbone(path)
    assert model.pretrained.conv1.weight.shape == (64, 1, 7, 7)
    assert any("from 3 to 1 input channel" in n for n in notes)
    x = np.random.default_rng(1).normal(size=(1, 1, 32, 32))
    got = _features(model.pretrained, x)[-1]
    expected = reference_dilated_resnet(sd, np.repeat(x, 3, axis=1), STAGES_OS8_MG)[-1]
    check("c4 (1 channel)", got, expected, dtype="float64", scope="model")


def test_six_channel_input_of_two_copies_matches_rgb(imagenet_file64):
    """conv1 tiled and scaled by 3/6: an image given twice (6 channels) gives the RGB features."""
    path, sd = imagenet_file64
    model = DANet(3, backbone="resnet50", in_channels=6).double()
    model.load_pretrained_backbone(path)
    x = np.random.default_rng(2).normal(size=(1, 3, 32, 32))
    got = _features(model.pretrained, np.concatenate([x, x], axis=1))[-1]
    check("c4 (6 channels)", got, reference_dilated_resnet(sd, x, STAGES_OS8_MG)[-1], dtype="float64", scope="model")
    with pytest.raises(ValueError, match="in_channels=6"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


def test_wrong_depth_and_stem_fail_before_anything_loads(imagenet_file):
    path, _ = imagenet_file
    with pytest.raises(ConvertError, match="ResNet-50, but the model's backbone is ResNet-101"):
        DANet(3, backbone="resnet101", pretrained_backbone=path)
    with pytest.raises(ConvertError, match="7x7-stem ResNet"):
        DANet(3, backbone="resnet50", deep_stem=True, pretrained_backbone=path)


def test_in_channels_is_checked():
    with pytest.raises(ValueError, match="`in_channels`"):
        DilatedResNet(50, in_channels=0)
    assert DilatedResNet(50, in_channels=4).conv1.weight.shape == (64, 4, 7, 7)
    assert DilatedResNet(50, deep_stem=True, in_channels=2).conv1[0].weight.shape == (64, 2, 3, 3)
