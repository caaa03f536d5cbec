"""``examples/attention_demo.py`` does what docs/ATTENTION.md says its figure shows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from parity_tests import reference as ref
from parity_tests.tests.helpers import check, state_numpy, to_numpy

pytest.importorskip("PIL")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "attention_demo.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present (installed package)")
def test_a_query_on_one_car_attends_to_both_cars(tmp_path):
    spec = importlib.util.spec_from_file_location("attention_demo", EXAMPLE)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    result = demo.main(["--out", str(tmp_path)])
    head = demo.make_head()
    head.load_state_dict(torch.load(tmp_path / "head.pth", weights_only=True))
    features = np.load(tmp_path / "features.npy")
    maps = head.attention_maps(torch.from_numpy(features[None]), [(60, 28)], size=demo.IMAGE_SIZE)
    objects = features[:4].argmax(0)  # the object at each feature position
    rows = to_numpy(maps.pam_rows)[0, 0]
    car = objects == demo.CLASSES.index("car")
    left = car & (np.arange(objects.shape[1]) < objects.shape[1] // 2)[None]
    assert rows[car].sum() > 0.95  # the query's own object...
    assert rows[car & ~left].sum() > 0.25  # ...including the other car, far away
    sd = state_numpy(head)
    x = ref.conv_bn_relu(features[None], sd, "conv5a")
    want = ref.position_attention_rows(x, sd["sa.query_conv.weight"], sd["sa.query_conv.bias"],
                                       sd["sa.key_conv.weight"], sd["sa.key_conv.bias"], maps.points)
    check("demo rows", rows[None, None], want)
    agree = (to_numpy(maps.segmentation)[0] == result["labels"]).mean()
    assert agree > 0.9, agree
