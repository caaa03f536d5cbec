"""weights_convert with Keras: bit-exact round trips, output parity, Keras file formats."""

from __future__ import annotations


import numpy as np
import pytest

pytestmark = pytest.mark.keras
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
pytest.importorskip("danet_keras")

import weights_convert as wc  # noqa: E402
from weights_convert.arch import ArchSpec  # noqa: E402
from weights_convert.cli import main  # noqa: E402
from weights_convert.mapping import keras_table, resolve_keras  # noqa: E402
from weights_convert.testing import SMALL_SPECS, random_torch_model, to_mmseg_names  # noqa: E402
from weights_convert.verify import verify  # noqa: E402


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def _random_keras(spec, seed=0):
    """A built Keras layer with every variable random (BN variance positive, counters non-zero)."""
    rng = np.random.default_rng(seed)
    layer = spec.build_keras(initialize=False)
    for row in keras_table(spec):
        var = resolve_keras(layer, row.keras_path)
        if row.rule == "int64":
            value = np.asarray(rng.integers(1, 1000), dtype=var.dtype)
        elif row.keras_path.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, var.shape).astype(var.dtype)
        else:
            value = rng.standard_normal(var.shape).astype(var.dtype)
        var.assign(value)
    return layer


def _keras_values(layer, spec):
    return {r.keras_path: np.array(keras.ops.convert_to_numpy(resolve_keras(layer, r.keras_path)))
            for r in keras_table(spec)}


@pytest.mark.parametrize("name", sorted(SMALL_SPECS))
def test_torch_keras_torch_bit_exact(name):
    spec = SMALL_SPECS[name]
    neutral = wc.from_torch(random_torch_model(spec))
    layer = wc.to_keras(neutral, spec)
    back = wc.from_torch(wc.to_torch(wc.from_keras(layer), spec))
    _same(neutral, back)
    assert wc.spec_from_keras(layer) == spec


@pytest.mark.parametrize("name", sorted(SMALL_SPECS))
def test_keras_torch_keras_bit_exact(name):
    spec = SMALL_SPECS[name]
    layer = _random_keras(spec)
    again = wc.to_keras(wc.from_torch(wc.to_torch(wc.from_keras(layer), spec)), spec)
    a, b = _keras_values(layer, spec), _keras_values(again, spec)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_build_without_initialization_and_allow_partial():
    """``initialize=False`` builds the same variables with zero convolutions; ``allow_partial`` keeps the random
    initial values of what it leaves out (the zero build is only for a complete assignment)."""
    spec = SMALL_SPECS["head"]
    drawn, zeros = spec.build_keras(), spec.build_keras(initialize=False)
    layout = lambda layer: [(v.path.split("/", 1)[1], tuple(v.shape), v.dtype) for v in layer.weights]  # noqa: E731
    assert layout(zeros) == layout(drawn)  # paths below the layer's own (numbered) name
    kernels = [v for v in zeros.weights if v.path.endswith("/kernel")]
    assert kernels and not any(np.any(keras.ops.convert_to_numpy(v)) for v in kernels)
    neutral = wc.from_torch(random_torch_model(spec))
    del neutral["conv5a.0.weight"]
    layer = wc.to_keras(neutral, spec, allow_partial=True)
    left = resolve_keras(layer, next(r.keras_path for r in keras_table(spec) if r.torch_name == "conv5a.0.weight"))
    assert np.any(keras.ops.convert_to_numpy(left))


@pytest.mark.parametrize("name", sorted(SMALL_SPECS))
def test_outputs_match_with_nonzero_gamma_and_bn_stats(name):
    spec = SMALL_SPECS[name]
    model = random_torch_model(spec, seed=3)
    neutral = wc.from_torch(model)
    assert all(float(v[0]) != 0 for k, v in neutral.items() if k.endswith("gamma"))
    layer_neutral = wc.from_keras(wc.to_keras(neutral, spec))
    for c in verify(neutral, spec, "torch", layer_neutral, spec, "keras", seed=1):
        assert c.passed, c.message()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the real ResNet-50 round trip runs once, on the TensorFlow pass")
def test_danet50_real_round_trip_and_outputs():
    spec = ArchSpec("danet", num_classes=3, backbone="resnet50")
    neutral = wc.from_torch(random_torch_model(spec))
    layer = wc.to_keras(neutral, spec)
    back = wc.from_keras(layer)
    _same(neutral, back)
    _same(neutral, wc.from_torch(wc.to_torch(back, spec)))
    for c in verify(neutral, spec, "torch", back, wc.spec_from_keras(layer), "keras", size=33):
        assert c.passed, c.message()


@pytest.mark.parametrize("deep_stem", [False, True])
def test_danet_keras_torch_keras_bit_exact(deep_stem):
    spec = ArchSpec("danet", num_classes=3, backbone="resnet50", deep_stem=deep_stem, multi_grid=None)
    layer = _random_keras(spec)
    again = wc.to_keras(wc.from_torch(wc.to_torch(wc.from_keras(layer), spec)), spec)
    a, b = _keras_values(layer, spec), _keras_values(again, spec)
    assert len(a) == len(layer.weights)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_keras_formats_via_cli(tmp_path, capsys):
    import h5py

    spec = SMALL_SPECS["head"]
    neutral = wc.from_torch(random_torch_model(spec))
    torch.save({"state_dict": {f"module.{k}": v for k, v in random_torch_model(spec).state_dict().items()}},
               tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "m.keras"), "--verify"]) == 0
    assert main([str(tmp_path / "m.keras"), str(tmp_path / "m.weights.h5"), "--verify"]) == 0
    with h5py.File(tmp_path / "m.weights.h5", "a") as f:  # a file from elsewhere: no stored architecture
        del f.attrs["danet_arch"]
    assert main([str(tmp_path / "m.weights.h5"), str(tmp_path / "back.pth"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 9 and "FAIL" not in out
    back = wc.from_torch(wc.to_torch(wc.load(tmp_path / "back.pth").weights, spec))
    _same(neutral, back)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("ext", [".keras", ".weights.h5"])
def test_allow_partial_writes_keras_formats(tmp_path, capsys, ext):
    """A Keras file holds every variable: ``--allow-partial`` writes the weights that fit, the notes name the rest,
    which keep their random initial values (as ``to_keras(allow_partial=True)``)."""
    spec = SMALL_SPECS["head"]
    neutral = wc.from_torch(random_torch_model(spec))
    partial = {k: v for k, v in neutral.items() if k != "conv5a.0.weight"}
    wc.save(partial, tmp_path / "partial.npz", spec, allow_partial=True)
    assert main([str(tmp_path / "partial.npz"), str(tmp_path / f"m{ext}"), "--allow-partial"]) == 0
    err = capsys.readouterr().err
    assert "left out 1 missing (conv5a.0.weight)" in err and "keep their random initial values" in err
    back = wc.load(tmp_path / f"m{ext}").weights
    _same(partial, {k: v for k, v in back.items() if k != "conv5a.0.weight"})
    assert back["conv5a.0.weight"].shape == neutral["conv5a.0.weight"].shape and np.any(back["conv5a.0.weight"])
    assert main([str(tmp_path / "partial.npz"), str(tmp_path / f"again{ext}"), "--allow-partial", "--verify"]) == 2
    assert "--verify needs every weight" in capsys.readouterr().err
    assert not (tmp_path / f"again{ext}").exists()


def test_keras_readers_build_without_random_draws(tmp_path, monkeypatch):
    """Every Conv2d that the ``.keras`` and ``.weights.h5`` readers build is built under ``no_init_weights``
    (the file assigns every weight next)."""
    import danet_keras as dk
    from danet_keras import layers

    spec = SMALL_SPECS["head"]
    neutral = wc.from_torch(random_torch_model(spec))
    for ext in (".keras", ".weights.h5"):
        wc.save(neutral, tmp_path / f"m{ext}", spec)
    built = []
    original = dk.Conv2d.build
    monkeypatch.setattr(dk.Conv2d, "build", lambda self, shape: built.append(layers._NO_INIT.get()) or
                        original(self, shape))
    for ext in (".keras", ".weights.h5"):
        built.clear()
        _same(neutral, wc.load(tmp_path / f"m{ext}").weights)
        assert built and all(built), (ext, built)


def test_mmseg_checkpoint_to_keras(tmp_path, capsys):
    spec = SMALL_SPECS["head"]
    neutral = wc.from_torch(random_torch_model(spec))
    ckpt = to_mmseg_names(neutral)
    ckpt["state_dict"] = {k: torch.from_numpy(np.array(v)) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "mmseg.pth")
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "m.weights.h5"), "--verify"]) == 0
    captured = capsys.readouterr()
    assert "skipped mmseg's FCN auxiliary head" in captured.err and "FAIL" not in captured.out
    _same(neutral, wc.load(tmp_path / "m.weights.h5").weights)


@pytest.mark.parametrize("ext", [".keras", ".weights.h5"])
def test_corrupt_keras_source(tmp_path, capsys, ext):
    spec = SMALL_SPECS["pam"]
    wc.save(wc.from_torch(random_torch_model(spec)), tmp_path / f"good{ext}", arch=spec)
    data = (tmp_path / f"good{ext}").read_bytes()
    (tmp_path / f"bad{ext}").write_bytes(data[: len(data) // 3])
    assert main([str(tmp_path / f"bad{ext}"), str(tmp_path / "dst.pth")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "dst.pth").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_wrong_architecture_for_weights_h5(tmp_path, capsys):
    spec = SMALL_SPECS["head"]
    wc.save(wc.from_torch(random_torch_model(spec)), tmp_path / "h.weights.h5", arch=spec)
    assert main([str(tmp_path / "h.weights.h5"), str(tmp_path / "dst.pth"), "--num-classes", "7"]) == 2
    assert "does not load into DANetHead(in_channels=64, num_classes=7)" in capsys.readouterr().err
    assert not (tmp_path / "dst.pth").exists()


def _wrapped(spec, *others):
    """A keras.Model around a random danet_keras layer of ``spec`` (``others``: more layers before it)."""
    layer = _random_keras(spec)
    inputs = x = keras.Input((None, None, spec.in_channels))
    for other in others:
        x = other(x)
    return keras.Model(inputs, layer(x)), layer


@pytest.mark.parametrize("name", ["pam", "cam", "dual_attention", "head"])
def test_weights_h5_of_a_model_wrapping_a_danet_layer(tmp_path, capsys, name):
    """``save_weights`` of a keras.Model around a danet_keras layer nests the layer's weights under
    ``layers/<name>/``: the reader finds that subtree, infers the architecture from it and loads it bit-exact."""
    spec = SMALL_SPECS[name]
    model, layer = _wrapped(spec)
    model.save_weights(tmp_path / "wrapped.weights.h5")
    channels = ["--in-channels", str(spec.in_channels)] if name == "cam" else []
    assert main([str(tmp_path / "wrapped.weights.h5"), str(tmp_path / "out.pth"), *channels]) == 0, \
        capsys.readouterr().err
    back = wc.load(tmp_path / "out.pth")
    assert back.arch == spec
    _same(wc.from_keras(layer, spec), back.weights)


def test_weights_h5_with_weights_outside_the_danet_layer(tmp_path, capsys):
    """Datasets outside the danet_keras layer's subtree are named and refused; ``--allow-partial`` converts the
    layer alone and names what it left out. Two danet_keras layers: refused, naming both."""
    spec = SMALL_SPECS["dual_attention"]
    model, layer = _wrapped(spec, keras.layers.Conv2D(64, 1))
    model.save_weights(tmp_path / "more.weights.h5")
    assert main([str(tmp_path / "more.weights.h5"), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert "layers/conv2d (2 arrays)" in err and "layers/dual_attention" in err and "--allow-partial" in err
    assert not (tmp_path / "out.pth").exists()
    assert main([str(tmp_path / "more.weights.h5"), str(tmp_path / "out.pth"), "--allow-partial"]) == 0
    assert "left out layers/conv2d (2 arrays)" in capsys.readouterr().err
    _same(wc.from_keras(layer, spec), wc.load(tmp_path / "out.pth").weights)

    inputs = keras.Input((None, None, 64))
    twice = keras.Model(inputs, _random_keras(spec)(_random_keras(spec)(inputs)))
    twice.save_weights(tmp_path / "twice.weights.h5")
    assert main([str(tmp_path / "twice.weights.h5"), str(tmp_path / "out2.pth")]) == 2
    err = capsys.readouterr().err
    assert "layers/dual_attention/" in err and "layers/dual_attention_1/" in err and "exactly one" in err
    assert not (tmp_path / "out2.pth").exists()


def test_weights_h5_load_errors_are_not_cut(tmp_path, capsys):
    """Keras' load error is kept whole: its first line ends in a colon, the reason follows."""
    spec = SMALL_SPECS["head"]
    wc.save(wc.from_torch(random_torch_model(spec)), tmp_path / "h.weights.h5", arch=spec)
    assert main([str(tmp_path / "h.weights.h5"), str(tmp_path / "dst.pth"), "--num-classes", "7"]) == 2
    err = capsys.readouterr().err
    assert "does not load into" in err and "must match" in err, err
    assert not err.rstrip().endswith(":")


def _cast_cases():
    """State dicts a Keras file cannot hold as they are: ``(state, the tensor that changes, its words)``."""
    sd = random_torch_model(SMALL_SPECS["head"]).state_dict()
    minority = dict(sd, **{"conv5a.0.weight": sd["conv5a.0.weight"].double()})
    half = {k: v.half() if k.endswith("weight") and v.dim() == 4 else v for k, v in sd.items()}
    fraction = dict(sd, **{"conv5a.1.num_batches_tracked": torch.tensor(3.5)})
    overflow = dict(sd, **{"conv5a.1.num_batches_tracked": torch.tensor(2 ** 31, dtype=torch.int64)})
    return {"float64-minority": (minority, "conv5a.1.weight", "float32 -> float64"),
            "float16-convs": (half, "conv5a.0.weight", "float16 -> float32"),
            "float-counter": (fraction, "conv5a.1.num_batches_tracked", "values change"),
            "counter-overflow": (overflow, "conv5a.1.num_batches_tracked", "values change")}


@pytest.mark.parametrize("ext", [".keras", ".weights.h5"])
@pytest.mark.parametrize("case", sorted(_cast_cases()))
def test_a_dtype_change_is_refused_unless_allow_cast(tmp_path, capsys, ext, case):
    """A Keras file holds one floating dtype and int32 counters: a tensor whose dtype or value would change is
    refused, named; ``--allow-cast`` writes it cast to the dtype that holds every value and names the cast."""
    state, name, words = _cast_cases()[case]
    torch.save(state, tmp_path / "mixed.pth")
    dst = tmp_path / f"out{ext}"
    assert main([str(tmp_path / "mixed.pth"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert name in err and words in err and "--allow-cast" in err, err
    if case == "float64-minority":  # the odd tensor out is named, not only the many it widens
        assert "the weights are float32 (" in err and "float64 (1: conv5a.0.weight)" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["mixed.pth"]
    assert main([str(tmp_path / "mixed.pth"), str(dst), "--allow-cast"]) == 0
    err = capsys.readouterr().err
    assert "note: cast" in err and name in err and words in err, err
    back = wc.load(dst).weights
    for k, v in state.items():
        if k != name:
            assert np.array_equal(back[k], v.numpy()), k  # as they were, or widened with every value kept
    assert back[name].dtype != state[name].numpy().dtype or not np.array_equal(back[name], state[name].numpy())
