"""The torch Dataset: tensors, the 0.5 mask threshold on soft masks, has_mask, bad masks."""
import numpy as np
import pytest
import torch
from PIL import Image

from training.data import IGNORE_INDEX, UNKNOWN_DEFECT, AnomalyDataset, DataLayoutError, Sample
from training.data.common import mask_to_float

# not OpenAI's statistics: the Dataset must apply whatever the backbone says (no default of its own)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def dataset(samples, size, **kwargs) -> AnomalyDataset:
    return AnomalyDataset(samples, size=size, mean=MEAN, std=STD, **kwargs)


def save(path, arr, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


@pytest.fixture
def rgb(tmp_path):
    rng = np.random.default_rng(0)
    return save(tmp_path / "img.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")


def test_good_image(rgb):
    ds = dataset([Sample(rgb, None, "p", None, 0, 0)], 4)
    px, cm, label, has = ds[0]
    assert px.dtype == torch.float32 and px.shape == (3, 4, 4)
    assert cm.dtype == torch.int64 and cm.shape == (4, 4) and int(cm.abs().sum()) == 0
    assert int(label) == 0 and bool(has)


def test_preprocess_matches_spec(rgb):
    ds = dataset([Sample(rgb, None, "p", None, 0, 0)], 5)
    px = ds[0][0].numpy()
    ref = np.asarray(Image.open(rgb).convert("RGB").resize((5, 5), Image.Resampling.BICUBIC), np.float32) / 255
    ref = ((ref - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(px, ref, atol=1e-5)


def test_soft_mask_threshold_before_int_cast(tmp_path, rgb):
    # values/255: 0, .39, .498, .502, .78, 1.0 -> strictly above 0.5 is defect.
    # casting to int first (the reference's bug) would keep only the 255 column.
    row = np.array([0, 100, 127, 128, 200, 255], np.uint8)
    m = save(tmp_path / "m.png", np.tile(row, (6, 1)), "L")
    ds = dataset([Sample(rgb, m, "p", "hole", 1, 7)], 6)
    _, cm, label, has = ds[0]
    np.testing.assert_array_equal(cm.numpy()[0], [0, 0, 0, 7, 7, 7])
    assert int(label) == 1 and bool(has)


def test_mask_resized_bilinear_then_thresholded(tmp_path):
    img = save(tmp_path / "i.png", np.zeros((4, 8, 3), np.uint8), "RGB")
    # left 4 columns 255, right 4 columns 0; 8x4 -> 2x2: left column defect, right normal
    arr = np.zeros((4, 8), np.uint8)
    arr[:, :4] = 255
    m = save(tmp_path / "m.png", arr, "L")
    cm = dataset([Sample(img, m, "p", "x", 1, 3)], 2)[0][1].numpy()
    np.testing.assert_array_equal(cm, [[3, 0], [3, 0]])
    # a one-pixel-wide soft edge at 60% survives downscaling to the same grid only when > 0.5
    arr2 = np.zeros((2, 2), np.uint8)
    arr2[:, 0] = 153  # 0.6
    m2 = save(tmp_path / "m2.png", arr2, "L")
    img2 = save(tmp_path / "i2.png", np.zeros((2, 2, 3), np.uint8), "RGB")
    cm2 = dataset([Sample(img2, m2, "p", "x", 1, 3)], 2)[0][1].numpy()
    np.testing.assert_array_equal(cm2, [[3, 0], [3, 0]])


def test_defective_without_mask_and_unknown_type(tmp_path, rgb):
    ds = dataset([Sample(rgb, None, "p", "hole", 1, 2)], 4)
    _, cm, label, has = ds[0]
    assert (cm == IGNORE_INDEX).all() and int(label) == 1 and not bool(has)
    m = save(tmp_path / "m.png", np.pad(np.full((2, 2), 255, np.uint8), 2), "L")
    unk = dataset([Sample(rgb, m, "p", None, 1, UNKNOWN_DEFECT)], 6)[0][1].numpy()
    assert set(np.unique(unk)) == {0, IGNORE_INDEX} and (unk != 0).sum() == 4


def test_mask_modes(tmp_path):
    assert mask_to_float(Image.fromarray(np.array([[0, 1, 2]], np.uint8), "L"), nonzero=True).tolist() == [[0, 1, 1]]
    m16 = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert mask_to_float(m16).tolist() == [[0.0, 1.0]]
    m1 = Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1")
    assert mask_to_float(m1).tolist() == [[0.0, 1.0]]


def test_visa_style_nonzero_mask(tmp_path, rgb):
    m = save(tmp_path / "m.png", np.pad(np.ones((2, 2), np.uint8), 2), "L")  # value 1 = defect
    cm = dataset([Sample(rgb, m, "p", "burnt", 1, 4, mask_nonzero=True)], 6)[0][1].numpy()
    assert (cm == 4).sum() == 4


def test_mask_size_mismatch_names_path(tmp_path, rgb):
    m = save(tmp_path / "bad_mask.png", np.zeros((5, 6), np.uint8), "L")
    ds = dataset([Sample(rgb, m, "p", "hole", 1, 1)], 4)
    with pytest.raises(DataLayoutError) as e:
        ds[0]
    assert str(m) in str(e.value) and "6x5" in str(e.value)
    with pytest.raises(DataLayoutError):
        dataset([Sample(rgb, m, "p", "hole", 1, 1)], 4, check_sizes=True)


def test_unreadable_image_names_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataLayoutError) as e:
        dataset([Sample(bad, None, "p", None, 0, 0)], 4)[0]
    assert str(bad) in str(e.value)


def test_sample_validation(rgb):
    with pytest.raises(ValueError):
        Sample(rgb, None, "p", None, 0, 3)
    with pytest.raises(ValueError):
        Sample(rgb, None, "p", "hole", 1, 0)


def test_dataloader_collates(rgb, tmp_path):
    m = save(tmp_path / "m.png", np.full((6, 6), 255, np.uint8), "L")
    ds = dataset([Sample(rgb, None, "p", None, 0, 0), Sample(rgb, m, "p", "hole", 1, 2),
                         Sample(rgb, None, "p", "hole", 1, 2)], 4)
    px, cm, label, has = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert px.shape == (3, 3, 4, 4) and cm.shape == (3, 4, 4)
    assert label.tolist() == [0, 1, 1] and has.tolist() == [True, True, False]
    assert (cm[1] == 2).all() and (cm[2] == IGNORE_INDEX).all()


def test_gray_and_rgba_images_become_rgb(tmp_path):
    g = save(tmp_path / "g.png", np.full((4, 4), 100, np.uint8), "L")
    rgba = save(tmp_path / "a.png", np.full((4, 4, 4), 200, np.uint8), "RGBA")
    for p in (g, rgba):
        px = dataset([Sample(p, None, "p", None, 0, 0)], 4)[0][0]
        assert px.shape == (3, 4, 4) and torch.isfinite(px).all()
