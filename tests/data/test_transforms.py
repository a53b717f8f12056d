"""Augmentation semantics (DESIGN.md section 2): alignment, scales, pad values, crop, flip."""

import numpy as np
import pytest
import torch

from cps_fast.config import IMAGENET_MEAN, IMAGENET_STD, PAPER_SCALES, DataConfig
from cps_fast.data.transforms import (AugParams, apply_params, denormalize, draw_params,
                                      normalize, resize_pair, scaled_size,
                                      train_transform, train_transform_with_params,
                                      val_transform)

from data_fakes import class_colour_image

COLOURS = [(230, 25, 25), (25, 230, 25), (25, 25, 230), (230, 230, 25), (25, 230, 230)]


def cfg(**kw):
    base = dict(dataset="voc", num_classes=21, crop_size=48)
    base.update(kw)
    return DataConfig(**base)


def manual(image, label, p, crop, ignore=255):
    """The spec, literally: resize, normalise, pad (image 0 / label 255), crop, flip."""
    image, label = resize_pair(image, label, p.size)
    x = (image.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    h, w = label.shape
    ph, pw = max(h, crop), max(w, crop)
    x = np.pad(x, ((0, ph - h), (0, pw - w), (0, 0)), constant_values=0)
    y = np.pad(label, ((0, ph - h), (0, pw - w)), constant_values=ignore)
    x = x[p.crop_y:p.crop_y + crop, p.crop_x:p.crop_x + crop]
    y = y[p.crop_y:p.crop_y + crop, p.crop_x:p.crop_x + crop]
    if p.flip:
        x, y = x[:, ::-1], y[:, ::-1]
    return x.transpose(2, 0, 1), y


def test_output_types_and_shapes():
    rng = np.random.default_rng(0)
    img, lab = class_colour_image(rng, 40, 70, COLOURS)
    x, y = train_transform(img, lab, np.random.default_rng(1), cfg())
    assert x.dtype == torch.float32 and x.shape == (3, 48, 48)
    assert y.dtype == torch.int64 and y.shape == (48, 48)
    x2, y2 = train_transform(img, None, np.random.default_rng(1), cfg())
    assert y2 is None and torch.equal(x, x2)  # the label never changes the image's draws


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_spec_literally(seed):
    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    img, lab = class_colour_image(rng, h, w, COLOURS)
    x, y, p = train_transform_with_params(img, lab, np.random.default_rng(seed), cfg())
    assert p.size == scaled_size(h, w, p.scale)
    assert 0 <= p.crop_y <= max(p.size[0], 48) - 48 and 0 <= p.crop_x <= max(p.size[1], 48) - 48
    ex, ey = manual(img, lab, p, 48)
    np.testing.assert_allclose(x.numpy(), ex, atol=2e-5)
    np.testing.assert_array_equal(y.numpy(), ey)


def test_image_and_label_stay_aligned():
    """Read the class back from the augmented image's colour; it must agree with the
    augmented label on >= 99% of pixels away from region borders."""
    rng = np.random.default_rng(5)
    pal = np.asarray(COLOURS, np.float32)
    agree = total = 0
    flips = set()
    for i in range(60):
        img, lab = class_colour_image(rng, int(rng.integers(40, 100)), int(rng.integers(40, 100)), COLOURS)
        x, y, p = train_transform_with_params(img, lab, np.random.default_rng(i), cfg())
        flips.add(p.flip)
        rgb = denormalize(x, IMAGENET_MEAN, IMAGENET_STD).astype(np.float32)
        cls = np.argmin(((rgb[:, :, None, :] - pal[None, None]) ** 2).sum(-1), axis=-1)
        y = y.numpy()
        # Interior: the label's 3x3 neighbourhood is one class (not padding).
        interior = np.zeros_like(y, bool)
        c = y[1:-1, 1:-1]
        interior[1:-1, 1:-1] = c != 255
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior[1:-1, 1:-1] &= y[1 + dy:y.shape[0] - 1 + dy, 1 + dx:y.shape[1] - 1 + dx] == c
        agree += int((cls[interior] == y[interior]).sum())
        total += int(interior.sum())
        # Padding: label 255 exactly where the image is 0 (the normalised mean).
        pad = y == 255
        assert np.all(x.numpy()[:, pad] == 0)
    assert total > 50000
    assert agree / total >= 0.99, agree / total
    assert flips == {True, False}


def test_scale_draws_cover_exactly_the_scale_set():
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(3000):
        p = draw_params(rng, 100, 150, PAPER_SCALES, 64)
        counts[p.scale] = counts.get(p.scale, 0) + 1
    assert set(counts) == set(PAPER_SCALES)
    for s, n in counts.items():
        assert 0.13 < n / 3000 < 0.21, (s, n)
    rng = np.random.default_rng(0)
    assert {draw_params(rng, 10, 10, (0.75, 1.0, 1.25), 16).scale for _ in range(300)} == {0.75, 1.0, 1.25}


def test_official_scale_set_by_name_reaches_the_augmentation():
    """--set data.scales=official: the torch path draws exactly the official code's set, and
    resizes to the drawn scale."""
    from cps_fast.config import OFFICIAL_SCALES, Config
    c = Config().apply_overrides(["data.scales=official", "data.crop_size=48"]).data
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.uint8)
    label = np.zeros((40, 60), np.uint8)
    seen = set()
    for _ in range(200):
        img, lab, p = train_transform_with_params(image, label, rng, c)
        seen.add(p.scale)
        assert p.size == scaled_size(40, 60, p.scale)
        # the image covers min(size, crop) of the window; the rest is label padding (255)
        valid = int((lab.numpy() != 255).sum())
        assert valid == min(p.size[0] - p.crop_y, 48) * min(p.size[1] - p.crop_x, 48)
    assert seen == set(OFFICIAL_SCALES) == {0.5, 0.75, 1.0, 1.5, 1.75, 2.0}


def test_pad_values_and_crop_size_small_image():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    lab = rng.integers(0, 21, (20, 30)).astype(np.uint8)
    p = AugParams(1.0, (20, 30), 0, 0, False)
    x, y = apply_params(img, lab, p, 48, IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    assert np.all(x[:, 20:, :] == 0) and np.all(x[:, :, 30:] == 0)
    assert np.all(y[20:, :] == 255) and np.all(y[:, 30:] == 255)
    np.testing.assert_array_equal(y[:20, :30], lab)
    np.testing.assert_allclose(x[:, :20, :30], normalize(img, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
    # Mirrored: the padding moves to the left.
    xf, yf = apply_params(img, lab, AugParams(1.0, (20, 30), 0, 0, True), 48, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(xf, x[:, :, ::-1])
    np.testing.assert_array_equal(yf, y[:, ::-1])
    assert np.all(yf[:, :18] == 255) and np.all(yf[:20, 18:] < 21)
    # Only crop offsets 0 are possible when the scaled image is smaller than the crop.
    r = np.random.default_rng(0)
    assert all(draw_params(r, 20, 30, (1.0,), 48).crop_y == 0 for _ in range(20))


def test_crop_offsets_and_flip_statistics():
    rng = np.random.default_rng(1)
    ys, xs, flips = set(), set(), 0
    for _ in range(2000):
        p = draw_params(rng, 60, 50, (1.0,), 48)
        ys.add(p.crop_y)
        xs.add(p.crop_x)
        flips += p.flip
    assert ys == set(range(13)) and xs == set(range(3))
    assert 900 < flips < 1100


def test_flip_off_keeps_the_other_draws():
    a = [draw_params(np.random.default_rng(s), 80, 90, PAPER_SCALES, 48, flip=True) for s in range(50)]
    b = [draw_params(np.random.default_rng(s), 80, 90, PAPER_SCALES, 48, flip=False) for s in range(50)]
    assert not any(p.flip for p in b) and any(p.flip for p in a)
    assert [(p.scale, p.crop_y, p.crop_x) for p in a] == [(p.scale, p.crop_y, p.crop_x) for p in b]


def test_label_resize_is_nearest():
    rng = np.random.default_rng(2)
    img, lab = class_colour_image(rng, 37, 53, COLOURS)
    for s in PAPER_SCALES:
        _, y = resize_pair(img, lab, scaled_size(37, 53, s))
        assert set(np.unique(y)) <= set(np.unique(lab))  # no interpolated class values


def test_val_transform_full_resolution():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    lab = rng.integers(0, 21, (33, 47)).astype(np.uint8)
    x, y = val_transform(img, lab, cfg())
    assert x.shape == (3, 33, 47) and x.dtype == torch.float32
    assert y.shape == (33, 47) and y.dtype == torch.int64
    ref = (img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.numpy(), ref.transpose(2, 0, 1), atol=2e-6)
    np.testing.assert_array_equal(y.numpy(), lab)
