"""Strict image / label readers: every bad file is a DataError naming it."""

import io as _io

import numpy as np
import pytest
from PIL import Image

from cps_fast.data.cityscapes_labels import labelid_to_trainid_lut
from cps_fast.data.io import read_image, read_label, read_pair
from cps_fast.errors import DataError

from data_fakes import save_image, save_label


def test_read_image_rgb_and_grey(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    save_image(str(tmp_path / "a.png"), arr)
    out = read_image(str(tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (12, 17, 3)
    np.testing.assert_array_equal(out, arr)
    Image.fromarray(arr[..., 0]).save(tmp_path / "g.png")
    g = read_image(str(tmp_path / "g.png"))
    assert g.shape == (12, 17, 3)
    np.testing.assert_array_equal(g[..., 1], arr[..., 0])


def test_truncated_jpeg_fails_naming_file(tmp_path):
    buf = _io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path = tmp_path / "dir with space" / "cut.jpg"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        read_image(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="x.jpg"):
        read_image(str(tmp_path / "x.jpg"))
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_image(str(tmp_path / "nope.png"))


def test_palette_label_read_as_indices(tmp_path):
    lab = np.array([[0, 1, 2], [15, 20, 255]], np.uint8)
    save_label(str(tmp_path / "p.png"), lab, palette=True)
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P"
    out = read_label(str(tmp_path / "p.png"), None, 21, 255)
    np.testing.assert_array_equal(out, lab)
    assert out.dtype == np.uint8


def test_palette_label_with_wrong_values(tmp_path):
    lab = np.array([[0, 1, 2], [40, 21, 255]], np.uint8)
    save_label(str(tmp_path / "bad.png"), lab, palette=True)
    with pytest.raises(DataError) as e:
        read_label(str(tmp_path / "bad.png"), None, 21, 255)
    msg = str(e.value)
    assert "bad.png" in msg and "21" in msg and "40" in msg


def test_label_out_of_range_grey(tmp_path):
    lab = np.zeros((5, 5), np.uint8)
    lab[2, 2] = 7
    save_label(str(tmp_path / "l.png"), lab)
    read_label(str(tmp_path / "l.png"), None, 8, 255)  # 7 < 8: fine
    with pytest.raises(DataError, match=r"l\.png: label values 7 outside 0\.\.5"):
        read_label(str(tmp_path / "l.png"), None, 6, 255)


def test_rgb_label_rejected(tmp_path):
    save_image(str(tmp_path / "c.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="c.png.*mode 'RGB'"):
        read_label(str(tmp_path / "c.png"), None, 21, 255)


def test_lut_applied_labelids_to_trainids(tmp_path):
    raw = np.array([[7, 8, 11, 0], [26, 33, 34, 1]], np.uint8)
    save_label(str(tmp_path / "ids.png"), raw)
    out = read_label(str(tmp_path / "ids.png"), labelid_to_trainid_lut(), 19, 255)
    np.testing.assert_array_equal(out, [[0, 1, 2, 255], [13, 18, 255, 255]])


def test_cityscapes_lut_is_the_standard_mapping():
    lut = labelid_to_trainid_lut()
    mapping = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for i in range(256):
        assert lut[i] == mapping.get(i, 255), i


def test_size_mismatch_names_both_files(tmp_path):
    save_image(str(tmp_path / "img.png"), np.zeros((10, 12, 3), np.uint8))
    save_label(str(tmp_path / "lab.png"), np.zeros((10, 11), np.uint8))
    with pytest.raises(DataError) as e:
        read_pair(str(tmp_path / "img.png"), str(tmp_path / "lab.png"), None, 21, 255)
    assert "img.png" in str(e.value) and "lab.png" in str(e.value)
    img, lab = read_pair(str(tmp_path / "img.png"), None, None, 21, 255)
    assert lab is None and img.shape == (10, 12, 3)
