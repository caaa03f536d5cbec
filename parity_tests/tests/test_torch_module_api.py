"""Every danet_torch module through the shared torch module tester (:mod:`parity_tests.tests.testers`).

Output shapes are written out by hand from the official architecture.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import danet_torch as dt  # noqa: E402
from parity_tests.tests.testers import run_torch_module_test  # noqa: E402
from weights_convert.testing import randomize_  # noqa: E402

B, H, W = 2, 7, 5
# (id, constructor, input shape, output shapes)
CASES = [
    ("pam", lambda: dt.PositionAttention(16), (B, 16, H, W), [(B, 16, H, W)]),
    ("cam", lambda: dt.ChannelAttention(16), (B, 16, H, W), [(B, 16, H, W)]),
    ("dual", lambda: dt.DualAttention(32, out_channels=8), (B, 32, H, W), [(B, 8, H, W)]),
    ("head", lambda: dt.DANetHead(32, 3), (B, 32, H, W), [(B, 3, H, W)] * 3),
    ("bottleneck", lambda: dt.Bottleneck(8, 4, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16))), (B, 8, H, W), [(B, 16, 4, 3)]),
]


def _random(make, seed=0):
    def build():
        torch.manual_seed(seed)
        return randomize_(make(), seed=seed).eval()
    return build


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_module_contract(case, tmp_path):
    _, make, shape, outputs = case
    run_torch_module_test(_random(make), shape, expected_output_shapes=outputs, tmp_path=tmp_path)


def test_resnet_and_danet_contract(tmp_path):
    """Compile and export of the whole network are covered by ``test_export_torch`` (DANet-50 through
    ``torch.export`` to ONNX) and ``test_torch_export_and_compile_of_head_match_eager``; here the rest."""
    s = 33  # stem /2 -> 17, maxpool /2 -> 9, layer2 /2 -> 5, output stride 8 keeps 5
    run_torch_module_test(_random(lambda: dt.DilatedResNet(50)), (1, 3, s, s), tmp_path=tmp_path,
                          expected_output_shapes=[(1, 256, 9, 9), (1, 512, 5, 5), (1, 1024, 5, 5), (1, 2048, 5, 5)],
                          compile_and_export=False)
    run_torch_module_test(_random(lambda: dt.DANet(3, backbone="resnet50")), (1, 3, s, s), tmp_path=tmp_path,
                          expected_output_shapes=[(1, 3, s, s)] * 3, compile_and_export=False)
