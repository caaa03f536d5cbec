"""A short run of ``examples/unet_dual_attention.py``: loss falls, gammas move, reload is exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("keras")

pytestmark = pytest.mark.keras

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "unet_dual_attention.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present (installed package)")
def test_unet_example_short_run(tmp_path):
    spec = importlib.util.spec_from_file_location("unet_dual_attention", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--epochs", "3", "--samples", "32", "--size", "16", "--batch-size", "8",
                          "--skip-attention", "--out", str(tmp_path)])
    assert result["final_loss"] < 0.9 * result["initial_loss"], result
    assert len(result["gammas"]) == 4 and all(g != 0.0 for g in result["gammas"].values()), result["gammas"]
    assert result["reload_max_diff"] == 0.0
