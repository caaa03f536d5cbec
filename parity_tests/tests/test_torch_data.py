"""danet_torch.data, the folder dataset: pairing, clear errors listing every problem, normalisation, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from danet_torch.data import DataError, SegmentationFolder, check_samples, scan_folder, split_samples
from parity_tests.tests.helpers import PALETTE, make_segmentation_folder

Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def folder(tmp_path):
    return make_segmentation_folder(tmp_path / "ds", 6, size=24, jpeg_every=3)


def test_scan_pairs_png_and_jpeg_by_stem(folder):
    samples = scan_folder(folder)
    assert [s.stem for s in samples] == [f"{i:03d}" for i in range(6)]
    assert samples[2].image.endswith("002.jpg") and samples[2].mask.endswith("002.png")
    counts = check_samples(samples, num_classes=3)
    assert counts.sum() == 6 * 23 * 24  # the first row of each mask is 255, ignored


def test_missing_mask_and_empty_folder(folder, tmp_path):
    (folder / "masks" / "004.png").unlink()
    with pytest.raises(DataError, match=r"(?s)1 image\(s\) .* have no mask.*004.png: no `004.png` in masks/"):
        scan_folder(folder)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match="No images .* the dataset is empty"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="must hold `images/` and `masks/`"):
        scan_folder(tmp_path / "nowhere")


def test_unknown_class_size_mismatch_and_rgb_mask_are_all_listed(folder):
    mask = np.array(Image.open(folder / "masks" / "001.png"))
    mask[5, 5] = 7
    Image.fromarray(mask).save(folder / "masks" / "001.png")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(folder / "masks" / "003.png")
    Image.fromarray(PALETTE[np.zeros((24, 24), int)]).save(folder / "masks" / "005.png")
    with pytest.raises(DataError) as info:
        check_samples(scan_folder(folder), num_classes=3)
    text = str(info.value)
    assert "3 problem(s)" in text
    assert "001.png: class id(s) [7] outside 0..2" in text
    assert "003: image 24x24, mask 24x20" in text
    assert "005.png: mode RGB" in text


def test_split_is_seeded_and_disjoint(folder):
    samples = scan_folder(folder)
    train, val = split_samples(samples, 0.34, seed=3)
    assert len(val) == 2 and not {s.stem for s in train} & {s.stem for s in val}
    assert split_samples(samples, 0.34, seed=3) == (train, val)
    with pytest.raises(DataError, match="cannot be split"):
        split_samples(samples[:1], 0.5)


def test_items_normalised_and_augmentation_reproducible(folder):
    samples = scan_folder(folder)
    val = SegmentationFolder(samples, train=False)
    x, y = val[0]
    raw = np.asarray(Image.open(samples[0].image).convert("RGB"), np.float64) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x, ((raw - mean) / std).transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    assert y.dtype == np.int64 and np.array_equal(y, np.asarray(Image.open(samples[0].mask)))
    train = SegmentationFolder(samples, train=True, crop=40, scale_range=(0.5, 1.5), seed=1)
    a, b = train[1], train[1]
    assert a[0].shape == (3, 40, 40) and a[1].shape == (40, 40)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert (a[1] == 255).any()  # 24-pixel images padded to 40 with the ignore label
    train.set_epoch(1)
    assert not np.array_equal(train[1][0], a[0])
    grey = SegmentationFolder(samples, train=False, in_channels=1)
    assert grey[0][0].shape == (1, 24, 24)
    with pytest.raises(ValueError, match="`in_channels`"):
        SegmentationFolder(samples, train=False, in_channels=2)


def test_truncated_image_is_listed_before_training(folder):
    """An image cut short (an interrupted copy) has an intact header: only decoding it finds the damage, which
    must happen in the check, not in a DataLoader worker mid-epoch."""
    data = (folder / "images" / "001.png").read_bytes()
    (folder / "images" / "001.png").write_bytes(data[:len(data) // 2])
    mask = np.array(Image.open(folder / "masks" / "004.png"))
    mask[3, 3] = 9
    Image.fromarray(mask).save(folder / "masks" / "004.png")
    with pytest.raises(DataError) as info:
        check_samples(scan_folder(folder), num_classes=3)
    text = str(info.value)
    assert "2 problem(s)" in text and "004.png: class id(s) [9]" in text, text
    assert "images/001.png: cannot be read (image file is truncated" in text, text


def test_one_bit_mask_is_class_ids_0_and_1(folder):
    """``Image.fromarray(bool_array).save(...)`` writes a 1-bit PNG (mode ``1``): a single-channel mask of
    classes 0 and 1, read as PIL's ``np.asarray`` gives it."""
    labels = np.asarray(Image.open(folder / "masks" / "002.png")) == 1
    Image.fromarray(labels).save(folder / "masks" / "002.png")
    assert Image.open(folder / "masks" / "002.png").mode == "1"
    samples = scan_folder(folder)
    counts = check_samples(samples[2:3], num_classes=2)
    np.testing.assert_array_equal(counts, [(~labels).sum(), labels.sum()])
    x, y = SegmentationFolder(samples, train=False)[2]
    assert y.dtype == np.int64 and np.array_equal(y, labels.astype(np.int64))
    a, b = SegmentationFolder(samples, train=True, crop=24, scale_range=(1.0, 1.0))[2]
    assert set(np.unique(b).tolist()) <= {0, 1}


def test_files_left_out_are_named(folder):
    """A .tif among the PNGs and a mask without its image are left out of the pairs; they were left out
    without a word (a sample lost)."""
    (folder / "images" / "extra.tif").write_bytes(b"II*\x00")
    (folder / "images" / ".DS_Store").write_bytes(b"")  # hidden files stay unmentioned
    (folder / "masks" / "orphan.png").write_bytes((folder / "masks" / "000.png").read_bytes())
    notes = []
    samples = scan_folder(folder, notes)
    assert "extra" not in [s.stem for s in samples] and "orphan" not in [s.stem for s in samples]
    assert notes == [f"1 file(s) in `{folder / 'images'}` are not PNG/JPEG images, left out: extra.tif",
                     f"1 mask(s) in `{folder / 'masks'}` have no image, left out: orphan.png"]
    with pytest.warns(UserWarning) as caught:
        scan_folder(folder)
    assert [str(w.message) for w in caught] == notes
