"""The built-in synthetic dataset: deterministic, complete, redone when interrupted."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_fast.config import DataConfig
from cps_fast.data.datasets import build_splits
from cps_fast.data.synthetic import (MARKER, SIZE_RANGE, SYNTHETIC_CLASS_NAMES,
                                     default_synthetic_root, ensure_synthetic,
                                     generate_synthetic, is_complete, render_scene)
from cps_fast.errors import ConfigError
from data_fakes import tree_bytes


def test_generation_is_deterministic_and_complete(tmp_path):
    a = generate_synthetic(str(tmp_path / "a"), n_train=6, n_val=3, seed=1)
    b = generate_synthetic(str(tmp_path / "b"), n_train=6, n_val=3, seed=1)
    fa, fb = tree_bytes(a), tree_bytes(b)
    assert fa == fb
    assert len([k for k in fa if k.startswith("JPEGImages")]) == 9
    assert len([k for k in fa if k.startswith("SegmentationClass")]) == 9
    assert not any(".tmp" in k for k in fa)
    assert is_complete(a) and is_complete(a, 6, 3, 1) and not is_complete(a, 7, 3, 1)
    train = Path(a, "ImageSets", "Segmentation", "train.txt").read_text().split()
    assert train == [f"train_{i:05d}" for i in range(6)]
    c = generate_synthetic(str(tmp_path / "c"), n_train=6, n_val=3, seed=2)
    assert tree_bytes(c)["JPEGImages/train_00000.jpg"] != fa["JPEGImages/train_00000.jpg"]


def test_interrupted_generation_is_redone(tmp_path):
    root = str(tmp_path / "s")
    generate_synthetic(root, 4, 2, 0)
    img = os.path.join(root, "JPEGImages", "train_00003.jpg")
    before = Path(img).read_bytes()
    os.remove(os.path.join(root, MARKER))  # as if killed before the marker was written
    os.remove(img)
    ensure_synthetic(root, 4, 2, 0, verbose=False)  # no marker: regenerates
    assert is_complete(root, 4, 2, 0)
    assert Path(img).read_bytes() == before  # same seed, same image


def test_complete_set_is_reused(tmp_path):
    root = str(tmp_path / "s")
    generate_synthetic(root, 3, 2, 0)
    os.remove(os.path.join(root, "JPEGImages", "train_00000.jpg"))
    ensure_synthetic(root, verbose=False)  # marker present: nothing regenerated
    assert not os.path.exists(os.path.join(root, "JPEGImages", "train_00000.jpg"))


def test_set_from_an_older_generator_is_regenerated(tmp_path):
    import json
    root = str(tmp_path / "s")
    generate_synthetic(root, 2, 1, 0)
    marker = os.path.join(root, MARKER)
    meta = json.loads(Path(marker).read_text())
    meta["revision"] -= 1
    Path(marker).write_text(json.dumps(meta))
    assert not is_complete(root)
    ensure_synthetic(root, 2, 1, 0, verbose=False)
    assert is_complete(root, 2, 1, 0)


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CPS_FAST_DATA_HOME", str(tmp_path))
    assert default_synthetic_root() == os.path.join(str(tmp_path), "synthetic-v1")
    monkeypatch.delenv("CPS_FAST_DATA_HOME")
    assert default_synthetic_root().endswith(os.path.join(".cache", "cps_fast", "synthetic-v1"))


def test_scenes_content():
    sizes, seen, colour = set(), set(), {c: [] for c in range(1, 6)}
    for i in range(40):
        img, lab = render_scene(np.random.default_rng(i))
        h, w = lab.shape
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        assert SIZE_RANGE[0] <= h <= SIZE_RANGE[1] and SIZE_RANGE[0] <= w <= SIZE_RANGE[1]
        sizes.add((h, w))
        vals = set(np.unique(lab).tolist())
        assert vals <= set(range(6)) | {255}
        assert 255 in vals  # ignore band on borders
        seen |= vals
        for c in range(1, 6):
            if (lab == c).sum() > 50:
                colour[c].append(img[lab == c].mean(0))
    assert any(h != w for h, w in sizes) and len(sizes) > 20
    assert seen == set(range(6)) | {255}
    # Colour alone does not give the class: each class's mean colour is near mid-grey and
    # varies a lot from object to object.
    for c, cols in colour.items():
        cols = np.array(cols)
        assert len(cols) >= 3, c
        assert np.all(np.abs(cols.mean(0) - 128) < 50), (c, cols.mean(0))
        assert cols.std(0).mean() > 20, c


def test_build_splits_on_synthetic(tmp_path):
    root = generate_synthetic(str(tmp_path / "s"), 16, 4, 0)
    cfg = DataConfig(dataset="synthetic", num_classes=6, root=root, split="1/8")
    sp = build_splits(cfg)
    assert len(sp.labeled) == 2 and len(sp.unlabeled) == 14 and len(sp.val) == 4
    assert sp.info.name == "synthetic" and sp.info.class_names == SYNTHETIC_CLASS_NAMES
    assert sp.info.background_index == 0 and sp.info.palette.shape == (6, 3)
    with Image.open(sp.labeled[0].label) as im:
        assert im.mode == "P"
    with pytest.raises(ConfigError, match="data.num_classes"):
        build_splits(DataConfig(dataset="synthetic", num_classes=21, root=root))
