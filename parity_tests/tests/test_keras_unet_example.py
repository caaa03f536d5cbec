"""``examples/unet_dual_attention.py``: a short run (loss falls, gammas move, reload is exact) and its export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("keras")

pytestmark = pytest.mark.keras

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "unet_dual_attention.py"


needs_example = pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present (installed package)")


def _example():
    spec = importlib.util.spec_from_file_location("unet_dual_attention", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_example
def test_unet_example_short_run(tmp_path):
    module = _example()
    result = module.main(["--epochs", "3", "--samples", "32", "--size", "16", "--batch-size", "8",
                          "--skip-attention", "--out", str(tmp_path)])
    assert result["final_loss"] < 0.9 * result["initial_loss"], result
    assert len(result["gammas"]) == 4 and all(g != 0.0 for g in result["gammas"].values()), result["gammas"]
    assert result["reload_max_diff"] == 0.0


@needs_example
def test_unet_exports_at_every_size_multiple_of_4_on_jax(tmp_path):
    """A SavedModel with symbolic sizes: jax2tf is told the sizes are multiples of 4 (two poolings)."""
    import keras
    import numpy as np

    from weights_convert.tolerances import compare, tolerance

    if keras.backend.backend() != "jax":
        pytest.skip("JAX only: on TensorFlow, Keras 3.15's UpSampling2D(interpolation='bilinear') cannot trace "
                    "unknown sizes (the attention layers alone export: test_export_keras.py)")
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    model = _example().build_unet(channels=1, num_classes=3, width=16)
    for v in model.weights:  # non-zero gammas: the attention takes part
        if v.path.endswith("gamma"):
            v.assign(np.full(v.shape, 0.7, "float32"))
    model(np.zeros((1, 16, 16, 1), "float32"))
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False,
                 jax2tf_kwargs={"polymorphic_shapes": ["(b, 4*h, 4*w, 1)"]})
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    rng = np.random.default_rng(1)
    for shape in ((2, 16, 24, 1), (1, 32, 8, 1)):
        x = rng.standard_normal(shape).astype("float32")
        result = compare(f"U-Net SavedModel at {shape}", np.asarray(reloaded.serve(x)),
                         keras.ops.convert_to_numpy(model(x)), tolerance("float32", "model"))
        assert result.passed, result.message()


@needs_example
def test_unet_example_takes_any_size_and_makes_its_out_folder(tmp_path):
    """An odd, non-square size (zero-padded to multiples of 4 inside the model, the logits cropped back) and an
    ``--out`` folder that does not exist yet."""
    import keras
    import numpy as np

    out = tmp_path / "runs" / "unet"
    result = _example().main(["--epochs", "1", "--samples", "8", "--size", "18", "23", "--batch-size", "4",
                              "--out", str(out)])
    assert result["path"] == str(out / "unet.keras") and (out / "unet.keras").is_file()
    assert result["reload_max_diff"] == 0.0
    model = keras.models.load_model(result["path"])
    assert model(np.zeros((2, 18, 23, 1), "float32")).shape == (2, 18, 23, 3)


@needs_example
@pytest.mark.parametrize("argv, message", [
    (["--size", "6"], "--size takes 1 or 2 integers >= 8, got [6]"),
    (["--size", "8", "9", "10"], "--size takes 1 or 2 integers >= 8, got [8, 9, 10]"),
    (["--epochs", "0"], "--epochs takes an integer >= 1, got 0"),
    (["--samples", "-1"], "--samples takes an integer >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size takes an integer >= 1, got 0"),
    (["--out", "a_file"], "--out takes a folder, got 'a_file', a file"),  # refused before training, not after
])
def test_unet_example_refuses_bad_arguments(argv, message, capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    argv = [str(tmp_path / a) if a == "a_file" else a for a in argv]
    message = message.replace("'a_file'", repr(str(tmp_path / "a_file")))
    with pytest.raises(SystemExit) as exit_info:
        _example().main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
