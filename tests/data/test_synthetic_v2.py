"""synthetic-v2: deterministic, lossless, appearance modes that a few labels miss; v1 stays
loadable beside it."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_fast.config import DataConfig
from cps_fast.data import synthetic, synthetic_v2 as v2
from cps_fast.data.datasets import build_splits
from cps_fast.data.generated import MARKER
from cps_fast.data.io import read_image, read_label
from data_fakes import tree_bytes


def test_generation_is_deterministic_by_seed(tmp_path):
    a = v2.generate(str(tmp_path / "a"), n_train=5, n_val=3, seed=1)
    b = v2.generate(str(tmp_path / "b"), n_train=5, n_val=3, seed=1)
    fa = tree_bytes(a)
    assert fa == tree_bytes(b)
    assert sorted(k for k in fa if k.startswith(os.path.join("train", "image"))) == \
        [os.path.join("train", "image", f"train_{i:05d}.png") for i in range(5)]
    assert len([k for k in fa if k.startswith(os.path.join("val", "label"))]) == 3
    assert not any(".tmp" in k for k in fa)
    assert Path(a, "train.txt").read_text().split() == [f"train_{i:05d}" for i in range(5)]
    c = v2.generate(str(tmp_path / "c"), n_train=5, n_val=3, seed=2)
    key = os.path.join("train", "image", "train_00000.png")
    assert tree_bytes(c)[key] != fa[key]
    # Image i depends only on (seed, side, i): a longer set starts with the same images.
    d = v2.generate(str(tmp_path / "d"), n_train=7, n_val=1, seed=1)
    assert tree_bytes(d)[key] == fa[key]


def test_images_are_lossless(tmp_path):
    root = v2.generate(str(tmp_path / "s"), n_train=3, n_val=1, seed=4)
    pal = v2.world_palettes(v2.Spec())
    for i in range(3):
        img, lab, _ = v2.render_scene(np.random.default_rng(
            np.random.SeedSequence([4, 2, 0, i])), v2.Spec(), pal)
        path = os.path.join(root, "train", "image", f"train_{i:05d}.png")
        with Image.open(path) as im:
            assert im.format == "PNG"
        assert np.array_equal(read_image(path), img)  # every pixel as drawn
        got = read_label(os.path.join(root, "train", "label", f"train_{i:05d}.png"), None, 6)
        assert np.array_equal(got, lab)


def test_classes_and_appearance_modes():
    spec = v2.Spec()
    pal = v2.world_palettes(spec)
    assert pal.shape == (5, spec.palettes, 2, 3)
    # Palettes are per class: no colour pair is shared between classes.
    flat = pal.reshape(5 * spec.palettes, 6)
    assert len(np.unique(np.round(flat), axis=0)) == len(flat)
    modes, counts, seen_vals = [], [], set()
    for i in range(256):
        img, lab, m = v2.render_scene(np.random.default_rng(np.random.SeedSequence([0, 2, 0, i])),
                                      spec, pal)
        h, w = lab.shape
        assert v2.SIZE_RANGE[0] <= h <= v2.SIZE_RANGE[1] and img.shape == (h, w, 3)
        assert spec.min_objects <= len(m) <= spec.max_objects
        vals = set(np.unique(lab).tolist())
        assert vals <= set(range(v2.NUM_CLASSES)) | {255}
        seen_vals |= vals
        # Each object's texture shows both colours of its palette (within the jitter).
        for cls, _, _ in m:
            if (lab == cls).sum() > 100:
                px = img[lab == cls].astype(np.float32)
                assert px.std(0).max() > 25, (i, cls)
        modes += m
        counts.append(len(m))
    assert seen_vals == set(range(v2.NUM_CLASSES)) | {255}  # every class, ignore band
    modes = np.array(modes)
    assert set(np.unique(modes[:, 1])) == {0, 1, 2}
    # A class has 3 periods x ``palettes`` colour pairs = 18 appearance modes. Half a pool
    # shows every mode many times; 32 images (1/16 of the 512-image pool) miss about a third
    # of the modes and show each palette only a few times.
    n32 = sum(counts[:32])
    assert len({tuple(x) for x in modes}) == 5 * 3 * spec.palettes
    few = modes[:n32]
    assert len({tuple(x) for x in few}) < 0.75 * 5 * 3 * spec.palettes
    per_palette = [((few[:, 0] == c) & (few[:, 2] == q)).sum()
                   for c in range(1, 6) for q in range(spec.palettes)]
    assert np.median(per_palette) <= 4
    per_class = np.bincount(modes[:, 0], minlength=6)[1:]
    assert per_class.min() > 0.6 * per_class.mean()  # classes drawn evenly


def test_alt_world_is_a_different_task():
    a, b = v2.world_palettes(v2.Spec()), v2.world_palettes(v2.Spec(world=1))
    assert not np.allclose(a, b)
    assert not set(v2.FAMILIES["main"]) & set(v2.FAMILIES["alt"])
    img, lab, _ = v2.render_scene(np.random.default_rng(0), v2.Spec(world=1, textures="alt"))
    assert img.shape[:2] == lab.shape


def test_build_splits_and_reuse(tmp_path):
    root = v2.generate(str(tmp_path / "s"), n_train=16, n_val=4, seed=0)
    sp = build_splits(DataConfig(dataset="synthetic-v2", num_classes=6, root=root, split="1/16"))
    assert len(sp.labeled) == 1 and len(sp.unlabeled) == 15 and len(sp.val) == 4
    assert sp.info.name == "synthetic-v2" and sp.info.class_names == v2.CLASS_NAMES
    assert sp.labeled[0].image.endswith(".png") and sp.info.background_index == 0
    # A finished set is reused as it is (whatever its counts); a half-written one is redone.
    os.remove(os.path.join(root, "val", "image", "val_00000.png"))
    v2.ensure(root, verbose=False)
    assert not os.path.exists(os.path.join(root, "val", "image", "val_00000.png"))
    os.remove(os.path.join(root, MARKER))
    v2.ensure(root, 16, 4, 0, verbose=False)
    assert os.path.exists(os.path.join(root, "val", "image", "val_00000.png"))
    assert v2.is_complete(root, 16, 4, 0) and not v2.is_complete(root, 16, 4, 0, v2.Spec(palettes=3))


def test_v1_is_still_loadable_beside_v2(tmp_path, monkeypatch):
    monkeypatch.setenv("CPS_FAST_DATA_HOME", str(tmp_path))
    assert v2.default_root().endswith("synthetic-v2")
    assert synthetic.default_synthetic_root().endswith("synthetic-v1")
    v1 = synthetic.generate_synthetic(str(tmp_path / "synthetic-v1"), 8, 2, 0)
    sp = build_splits(DataConfig(dataset="synthetic", num_classes=6, split="1/8"))
    assert sp.sources["root"] == os.path.abspath(v1)
    assert sp.labeled[0].image.endswith(".jpg") and sp.info.name == "synthetic"


def test_spec_rejects_unknown_textures():
    with pytest.raises(ValueError, match="textures"):
        v2.Spec(textures="plaid")


def test_never_generates_over_other_data(tmp_path):
    """A mistyped data.dataset or --data-root must not overwrite a user's data."""
    from cps_fast.errors import DataError
    v1 = synthetic.generate_synthetic(str(tmp_path / "v1"), 3, 1, 0)
    with pytest.raises(DataError, match="holds the generated synthetic"):
        build_splits(DataConfig(dataset="synthetic-v2", num_classes=6, root=v1))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="only into an empty or new folder"):
        v2.ensure(str(other), verbose=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_no_import_circle_between_the_index_and_the_generators():
    """datasets.py imports the generators; they import only info.py / generated.py."""
    import ast
    import cps_fast.data as pkg
    base = os.path.dirname(pkg.__file__)
    for name in ("synthetic", "synthetic_v2", "fashion", "generated", "info"):
        tree = ast.parse(Path(base, f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.split(".")[-1] in ("datasets", "loader")}, name


def test_v1_never_generates_over_v2(tmp_path):
    from cps_fast.errors import DataError
    root = v2.generate(str(tmp_path / "v2"), 3, 1, 0)
    with pytest.raises(DataError, match="holds the generated synthetic-v2 dataset, not synthetic"):
        build_splits(DataConfig(dataset="synthetic", num_classes=6, root=root))
    assert v2.is_complete(root, 3, 1, 0)


def test_instance_maps_match_the_labels():
    spec = v2.Spec()
    a = v2.render_scene(v2.scene_rng(0, 0, 5), spec)
    img, lab, modes, inst = v2.render_scene(v2.scene_rng(0, 0, 5), spec, instances=True)
    assert np.array_equal(img, a[0]) and np.array_equal(lab, a[1]) and modes == a[2]
    assert inst.max() == len(modes)
    for k, (cls, _, _) in enumerate(modes, start=1):
        shown = lab[inst == k]
        assert set(np.unique(shown).tolist()) <= {cls, 255}
    assert np.all((lab == 0) == ((inst == 0) & (lab != 255)))
