"""The Fashion-MNIST mosaic adapter, on tiny fake idx files (CI needs neither apt nor the
Debian package): idx reading, exact masks, train/val from the train/test files, the data
tools, and a clear one-line error when the files are missing."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from cps_fast.config import DataConfig
from cps_fast.data import fashion
from cps_fast.data.cli import main
from cps_fast.data.datasets import build_splits
from cps_fast.data.io import read_image, read_label
from cps_fast.errors import DataError

TRAIN_VALUES, TEST_VALUES = (60, 120), (160, 250)  # item pixels of the fake train / test files


def idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def fake_items(rng, n, values):
    """n fake 28x28 items: a random rectangle of non-zero pixels (with holes) on exact 0."""
    imgs = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, 8, size=2)
        y1, x1 = rng.integers(18, 28, size=2)
        imgs[i, y0:y1, x0:x1] = rng.integers(*values, size=(y1 - y0, x1 - x0))
        imgs[i, (y0 + y1) // 2, x0:x1] = 0  # a zero line inside: background, not item
    return imgs, rng.integers(0, 10, size=n).astype(np.uint8)


def make_source(path, n_train=40, n_test=20, gz=True):
    """The four idx files of Fashion-MNIST, fake and tiny."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    parts = {"train": fake_items(rng, n_train, TRAIN_VALUES),
             "t10k": fake_items(rng, n_test, TEST_VALUES)}
    for part, (imgs, labs) in parts.items():
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labs)):
            name = os.path.join(path, f"{part}-{kind}-ubyte")
            if gz:
                with gzip.open(name + ".gz", "wb") as f:
                    f.write(idx_bytes(arr))
            else:
                with open(name, "wb") as f:
                    f.write(idx_bytes(arr))
    return str(path), parts


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    src, parts = make_source(tmp_path / "src", gz=gz)
    imgs, labs = fashion.load_items(src, "train")
    assert np.array_equal(imgs, parts["train"][0]) and np.array_equal(labs, parts["train"][1])
    imgs, _ = fashion.load_items(src, "test")
    assert np.array_equal(imgs, parts["t10k"][0])


def test_bad_idx_files_are_named(tmp_path):
    bad = tmp_path / "x-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="x-idx: not an unsigned-byte idx file"):
        fashion.read_idx(str(bad))
    bad.write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(DataError, match=r"x-idx: idx header says \(2, 3\)"):
        fashion.read_idx(str(bad))


def test_mosaic_masks_are_exact(tmp_path):
    src, _ = make_source(tmp_path / "src")
    imgs, labs = fashion.load_items(src, "train")
    grids = set()
    for i in range(30):
        img, lab, items = fashion.render_mosaic(np.random.default_rng(i), imgs, labs)
        assert img.shape == (fashion.CANVAS, fashion.CANVAS, 3) and lab.shape == img.shape[:2]
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
        grey = img[..., 0]
        # Background is exactly 0 and class 0; every non-zero pixel is its item's class + 1.
        assert np.all(lab[grey == 0] == 0)
        assert np.all(lab[grey > 0] > 0)
        seen = np.zeros_like(lab, dtype=bool)
        for idx, cls, y0, x0, size, cell in items:
            assert cls == int(labs[idx]) + 1
            box = (slice(y0, y0 + size), slice(x0, x0 + size))
            assert not seen[box].any()  # items never overlap
            seen[box] = True
            assert np.all(lab[box][grey[box] > 0] == cls)
            assert (grey[box] > 0).any()
            # inside its cell, at 0.7-1.0 of the cell's size
            assert y0 // cell == (y0 + size - 1) // cell and x0 // cell == (x0 + size - 1) // cell
            assert 0.7 * cell - 1 <= size <= cell
            grids.add(cell)
        assert np.all(lab[~seen] == 0) and np.all(grey[~seen] == 0)
        assert np.all((grey == 0) | (grey >= fashion.HALO))  # no faint halo left
    assert grids == {fashion.CANVAS // g for g in fashion.GRIDS}  # every grid size occurs


def test_tree_train_from_train_val_from_test(tmp_path):
    src, _ = make_source(tmp_path / "src")
    root = fashion.generate(str(tmp_path / "m"), src, n_train=12, n_val=6, seed=0)
    sp = build_splits(DataConfig(dataset="fashion", num_classes=11, root=root, split="1/4"))
    assert (len(sp.labeled), len(sp.unlabeled), len(sp.val)) == (3, 9, 6)
    assert sp.info.class_names[0] == "background" and sp.info.class_names[1] == "t-shirt/top"
    for samples, (lo, hi) in ((sp.labeled + sp.unlabeled, TRAIN_VALUES), (sp.val, TEST_VALUES)):
        for s in samples:
            img = read_image(s.image)[..., 0]
            lab = read_label(s.label, None, 11)
            nz = img[img > 0]
            # Items of the train file only in train mosaics, of the test file only in val
            # (bilinear scaling blends an item's edge with 0, never above its range).
            assert nz.size and nz.max() < hi and np.median(nz) >= lo
            assert np.array_equal(lab > 0, img > 0)
    # Deterministic.
    again = fashion.generate(str(tmp_path / "m2"), src, n_train=12, n_val=6, seed=0)
    for side in ("train", "val"):
        for f in os.listdir(os.path.join(root, side, "image")):
            with open(os.path.join(root, side, "image", f), "rb") as a, \
                    open(os.path.join(again, side, "image", f), "rb") as b:
                assert a.read() == b.read()


def test_data_tools_work_on_it(tmp_path, monkeypatch, capsys):
    src, _ = make_source(tmp_path / "src")
    monkeypatch.setenv(fashion.ENV, src)
    root = str(tmp_path / "m")
    args = ["--dataset", "fashion", "--data-root", root]
    assert main(["prepare", *args, "--n-train", "16", "--n-val", "4"]) == 0
    assert fashion.is_complete(root, 16, 4, 0)
    assert main(["check", *args, "--split", "1/8"]) == 0
    assert "2 labeled, 14 unlabeled, 4 val; 0 problem(s)" in capsys.readouterr().out
    assert main(["splits", *args, "--split", "1/8", "1/4", "--out", str(tmp_path / "sp")]) == 0
    assert sorted(os.listdir(tmp_path / "sp")) == sorted(
        f"train_aug_{k}_{t}.txt" for k in ("labeled", "unlabeled") for t in ("1-8", "1-4"))
    assert main(["preview", *args, "--out", str(tmp_path / "pv"), "-n", "2",
                 "--set", "data.crop_size=64"]) == 0
    assert sorted(os.listdir(tmp_path / "pv")) == ["preview_000.png", "preview_001.png"]


def test_missing_package_is_one_clear_line(tmp_path):
    env = dict(os.environ, **{fashion.ENV: str(tmp_path / "nowhere"),
                              "CPS_FAST_DATA_HOME": str(tmp_path / "home")})
    r = subprocess.run([sys.executable, "-m", "cps_fast.data", "check", "--dataset", "fashion"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fashion: no Fashion-MNIST idx files")
    assert "apt-get install dataset-fashion-mnist" in lines[0] and fashion.ENV in lines[0]
