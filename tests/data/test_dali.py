"""DALI pipelines (CPU backend here; the mixed-decoder tests are `gpu`-marked).

Reference everywhere: the PyTorch loader (``loader.TrainStream``) and its augmentation
(``transforms.apply_params``). Tiny images in tmp_path; the whole file runs in well under a
minute on one core.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.dali

from cps_fast.config import DataConfig  # noqa: E402
from cps_fast.data.datasets import DatasetInfo, Sample, Splits, voc_palette  # noqa: E402
from cps_fast.errors import DataError  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Class colours far apart from each other (and from the zero padding's mean colour).
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [255, 0, 255]], np.uint8)
IGNORE_COLOUR = np.array([255, 255, 255], np.uint8)


def _dali():
    from cps_fast.data import dali
    return dali


def _info(lut=None, num_classes=len(COLOURS)):
    return DatasetInfo("test", num_classes, 255, tuple(f"c{i}" for i in range(num_classes)),
                       voc_palette(num_classes), 0, lut)


def _save_label(path, lab, mode):
    if mode == "P":
        im = Image.frombytes("P", (lab.shape[1], lab.shape[0]), np.ascontiguousarray(lab).tobytes())
        im.putpalette(voc_palette(256).reshape(-1).tolist())
    elif mode == "I;16":
        im = Image.fromarray(lab.astype(np.uint16))
    else:
        im = Image.fromarray(lab, "L")
    im.save(path, format="PNG")


def _scene(rng, h, w):
    """Rectangles of classes on class 0, an ignore patch; image = flat class colours."""
    lab = np.zeros((h, w), np.uint8)
    for _ in range(5):
        y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
        lab[y0:y0 + rng.integers(6, h // 2 + 6), x0:x0 + rng.integers(6, w // 2 + 6)] = \
            rng.integers(1, len(COLOURS))
    lab[:4, :4] = 255
    img = np.where(lab[..., None] == 255, IGNORE_COLOUR, COLOURS[np.minimum(lab, len(COLOURS) - 1)])
    return img.astype(np.uint8), lab


def make_set(root, n=10, fmt="png", label_modes=("P", "L"), seed=0, size=(24, 48)):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        img, lab = _scene(rng, h, w)
        ip, lp = os.path.join(root, f"im{i:03d}.{fmt}"), os.path.join(root, f"lab{i:03d}.png")
        Image.fromarray(img).save(ip, **({"quality": 95} if fmt == "jpg" else {}))
        _save_label(lp, lab, label_modes[i % len(label_modes)])
        out.append(Sample(f"s{i:03d}", ip, lp))
    return out


def cfg_for(**kw):
    base = dict(dataset="voc", crop_size=40, batch_size=4, unlabeled_batch_size=3,
                num_workers=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def pngset(tmp_path_factory):
    return make_set(str(tmp_path_factory.mktemp("pngset")), n=10)


def stream(samples, cfg, seed=0, name="labeled", labels=True, **kw):
    return _dali().DaliTrainStream(samples, _info(kw.pop("lut", None)), cfg, cfg.batch_size,
                                   seed, name, labels, device="cpu", **kw)


def reference(sample, params, cfg, info):
    """The PyTorch path's output for this sample under the same drawn parameters."""
    from cps_fast.data.io import read_pair
    from cps_fast.data.transforms import apply_params
    image, label = read_pair(sample.image, sample.label, info.label_lut, info.num_classes)
    return apply_params(image, label, params, cfg.crop_size, cfg.mean, cfg.std)


def interior(lab: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one label (away from object borders)."""
    p = np.pad(lab, 1, mode="edge")
    same = np.ones(lab.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= p[1 + dy:1 + dy + lab.shape[0], 1 + dx:1 + dx + lab.shape[1]] == lab
    return same


def colour_to_label(img_chw: np.ndarray) -> np.ndarray:
    """Read the class back from a normalised image (nearest class colour; ignore colour ->
    255; exact zeros = padding -> 255)."""
    x = img_chw.transpose(1, 2, 0) * np.asarray(STD) + np.asarray(MEAN)
    x = x * 255.0
    table = np.concatenate([COLOURS, IGNORE_COLOUR[None]]).astype(np.float64)
    d = ((x[:, :, None, :] - table[None, None]) ** 2).sum(-1)
    lab = d.argmin(-1).astype(np.uint8)
    lab[lab == len(COLOURS)] = 255
    lab[(img_chw == 0).all(0)] = 255
    return lab


# --------------------------------------------------------------------------- augmentation


def test_alignment_image_label_after_augmentation(pngset):
    cfg = cfg_for(crop_size=40)
    s = stream(pngset, cfg, seed=3)
    agree = total = 0
    for _ in range(6):
        b = next(s)
        for img, lab in zip(b["image"].numpy(), b["label"].numpy()):
            read = colour_to_label(img)
            m = interior(lab)
            agree += int((read[m] == lab[m]).sum())
            total += int(m.sum())
    s.close()
    assert total > 5000
    assert agree / total >= 0.99, agree / total


def test_identical_params_match_torch_reference(pngset):
    """Same drawn parameters -> labels equal away from borders, images within the resampling
    filter's difference (DALI's antialiased linear vs PIL's bilinear)."""
    cfg = cfg_for(crop_size=36)
    info = _info()
    s = stream(pngset, cfg, seed=1)
    lab_agree = lab_total = 0
    for _ in range(5):
        b = next(s)
        for k, (smp, p) in enumerate(zip(s.last_samples, s.last_params)):
            ref_img, ref_lab = reference(smp, p, cfg, info)
            img, lab = b["image"][k].numpy(), b["label"][k].numpy()
            m = interior(ref_lab)
            lab_agree += int((lab[m] == ref_lab[m]).sum())
            lab_total += int(m.sum())
            assert np.array_equal(ref_lab == 255, lab == 255) or p.scale != 1.0
            # padding is exact: same pixels, 0 and 255
            pad = (ref_img == 0).all(0) & (ref_lab == 255)
            np.testing.assert_array_equal(img[:, pad], 0)
            assert (lab[pad] == 255).all()
            diff = np.abs(img - ref_img)
            assert diff[:, m].mean() < 0.02, (p, diff.mean())
            if p.scale == 1.0:  # no resampling: exact up to float rounding
                assert diff.max() < 1e-4
                assert np.array_equal(lab, ref_lab)
    s.close()
    assert lab_agree / lab_total >= 0.999, lab_agree / lab_total


def test_drawn_scales_cover_exactly_the_set(pngset):
    cfg = cfg_for(crop_size=24, batch_size=8)
    s = stream(pngset, cfg, seed=0)
    seen = set()
    for _ in range(8):
        next(s)
        seen |= {p.scale for p in s.last_params}
        for smp, p in zip(s.last_samples, s.last_params):
            h, w = Image.open(smp.image).size[::-1]
            assert p.size == (max(1, int(np.floor(h * p.scale + 0.5))),
                              max(1, int(np.floor(w * p.scale + 0.5))))
    s.close()
    assert seen == set(cfg.scales)


def test_official_scale_set_by_name_reaches_the_pipeline(pngset):
    """--set data.scales=official goes through DataConfig to the DALI stream's draws: every
    drawn scale is from the official code's set, and the whole set is drawn."""
    from cps_fast.config import OFFICIAL_SCALES, Config
    cfg = Config().apply_overrides(["data.dataset=voc", "data.num_classes=21",
                                    "data.scales=official", "data.crop_size=24",
                                    "data.batch_size=8", "data.num_workers=1"]).data
    s = stream(pngset, cfg, seed=1)
    seen = set()
    for _ in range(8):
        b = next(s)
        assert b["image"].shape == (8, 3, 24, 24)
        seen |= {p.scale for p in s.last_params}
    s.close()
    assert seen == set(OFFICIAL_SCALES) == {0.5, 0.75, 1.0, 1.5, 1.75, 2.0}


def test_crop_size_padding_and_flip(pngset):
    """Crop bigger than most scaled images: padding at the bottom / right (left when
    flipped), image 0 exactly and label 255 there; flips mirror image and label together."""
    cfg = cfg_for(crop_size=64, batch_size=5)
    s = stream(pngset, cfg, seed=5)
    flips = set()
    for _ in range(4):
        b = next(s)
        assert b["image"].shape == (5, 3, 64, 64) and b["image"].dtype == torch.float32
        assert b["label"].shape == (5, 64, 64) and b["label"].dtype == torch.int64
        for k, p in enumerate(s.last_params):
            img, lab = b["image"][k].numpy(), b["label"][k].numpy()
            rh = min(p.size[0] - p.crop_y, 64)
            rw = min(p.size[1] - p.crop_x, 64)
            cols = np.arange(64)
            cols = cols[::-1] if p.flip else cols
            valid = np.zeros((64, 64), bool)
            valid[:rh, :rw] = True
            valid = valid[:, cols]
            assert (lab[~valid] == 255).all()
            np.testing.assert_array_equal(img[:, ~valid], 0.0)
            assert not (img[:, valid] == 0).all(0).any()  # no class colour maps to exactly 0
            flips.add(p.flip)
    s.close()
    assert flips == {True, False}


def test_flip_off_and_no_labels(pngset):
    cfg = cfg_for(crop_size=32, flip=False, batch_size=3)
    s = stream(pngset, cfg, seed=2, name="unlabeled", labels=False)
    b = next(s)
    assert set(b) == {"image"} and b["image"].shape == (3, 3, 32, 32)
    assert not any(p.flip for p in s.last_params)
    s.close()


# --------------------------------------------------------------------------- determinism


def _take(s, n):
    out = [next(s) for _ in range(n)]
    return out


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_same_seed_same_batches_and_torch_order(pngset):
    cfg = cfg_for(crop_size=24, batch_size=3)
    a, b, c = stream(pngset, cfg, seed=11), stream(pngset, cfg, seed=11), stream(pngset, cfg, seed=12)
    ba, bb, bc = _take(a, 5), _take(b, 5), _take(c, 5)
    assert _same(ba, bb)
    assert not _same(ba, bc)
    # The same sample order as the PyTorch loader (its sampler is reused).
    from cps_fast.data.loader import TrainStream
    t = TrainStream(pngset, _info(), cfg_for(crop_size=24, batch_size=3, num_workers=0), 3, 11,
                    "labeled")
    order = np.concatenate([t.epoch_indices(0), t.epoch_indices(1)])
    a2 = stream(pngset, cfg, seed=11)
    got = []
    for _ in range(6):
        next(a2)
        got += [pngset.index(x) for x in a2.last_samples]
    assert got == order[:18].tolist()
    for s in (a, b, c, a2):
        s.close()
    t.close()


def test_resume_gives_the_same_next_batches(pngset):
    cfg = cfg_for(crop_size=24, batch_size=4)  # 10 samples: batches straddle epochs
    a = stream(pngset, cfg, seed=4)
    _take(a, 3)
    state = a.state_dict()
    assert state == {"epoch": 1, "position": 2}
    nxt = _take(a, 3)
    b = stream(pngset, cfg, seed=4)
    b.load_state_dict(state)
    assert _same(nxt, _take(b, 3))
    # and within a running stream: rewind
    a.load_state_dict(state)
    assert _same(nxt, _take(a, 3))
    assert a.epoch == 2 and a.state_dict() == b.state_dict()
    with pytest.raises(DataError):
        b.load_state_dict({"epoch": 0, "position": 99})
    a.close()
    b.close()


def test_shards_disjoint_and_covering(pngset):
    cfg = cfg_for(crop_size=16, batch_size=2)
    world = 3
    per_rank = []
    for r in range(world):
        s = _dali().DaliTrainStream(pngset, _info(), cfg, 2, 9, "labeled", True, rank=r,
                                    world_size=world, device="cpu")
        ids = []
        while s.epoch == 0:
            next(s)
            ids += [x.id for x in s.last_samples]
        assert ids[:len(s)] == [pngset[i].id for i in s.epoch_indices(0)]
        per_rank.append(ids[:len(s)])
        s.close()
    allids = [i for ids in per_rank for i in ids]
    assert set(allids) == {x.id for x in pngset}            # cover
    assert len(allids) - len(set(allids)) <= world - 1       # disjoint apart from the wrap
    assert len(allids) == -(-len(pngset) // world) * world


def test_statistics_match_the_torch_loader(tmp_path):
    """Same data, same seed: the PyTorch loader and DALI see the same samples with the same
    parameters, so per-pixel statistics agree closely (JPEG inputs: both decoders are
    libjpeg-turbo here)."""
    from cps_fast.data.loader import build_train_streams
    samples = make_set(str(tmp_path), n=8, fmt="jpg", size=(40, 60))
    splits = Splits(samples[:4], samples[4:], [], _info())
    cfg = cfg_for(crop_size=32, batch_size=4, unlabeled_batch_size=4, num_workers=0)
    d = _dali().build_dali_streams(cfg, splits, 5, "cps-cutmix", device="cpu")
    t = build_train_streams(cfg, splits, 5, "cps-cutmix")
    assert set(d) == set(t) == {"labeled", "unlabeled", "unlabeled2"}
    sup = _dali().build_dali_streams(cfg, splits, 5, "supervised", device="cpu")
    assert set(sup) == {"labeled"}
    with pytest.raises(DataError):
        _dali().build_dali_streams(cfg, Splits(samples[:4], [], [], _info()), 5, "cps",
                                   device="cpu")
    for _ in range(3):
        for k in d:
            x, y = next(d[k]), next(t[k])
            assert x["image"].shape == y["image"].shape
            assert abs(float(x["image"].mean() - y["image"].mean())) < 0.01
            assert abs(float(x["image"].std() - y["image"].std())) < 0.01
            assert float((x["image"] - y["image"]).abs().mean()) < 0.03
            if "label" in x:
                hx = torch.bincount(x["label"].flatten(), minlength=256).float()
                hy = torch.bincount(y["label"].flatten(), minlength=256).float()
                assert float((hx - hy).abs().sum() / hy.sum()) < 0.02
    for s in (*d.values(), *t.values()):
        s.close()


# --------------------------------------------------------------------------- outputs


def test_buffers_dtypes_and_channels_last(pngset):
    cfg = cfg_for(crop_size=24, batch_size=2)
    plain = next(stream(pngset, cfg, seed=8))
    img_buf = torch.empty(2, 3, 24, 24)
    lab_buf = torch.empty(2, 24, 24, dtype=torch.int64)
    s = stream(pngset, cfg, seed=8)
    out = s.next_into({"image": img_buf, "label": lab_buf})
    assert out["image"] is img_buf and out["label"] is lab_buf
    assert torch.equal(img_buf, plain["image"]) and torch.equal(lab_buf, plain["label"])
    s.close()
    cl = stream(pngset, cfg, seed=8, channels_last=True, image_dtype=torch.float16,
                label_dtype=torch.uint8)
    b = next(cl)
    assert b["image"].dtype == torch.float16 and b["label"].dtype == torch.uint8
    assert b["image"].shape == (2, 3, 24, 24)
    assert b["image"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b["image"].float(), plain["image"], atol=2e-2, rtol=1e-2)
    assert torch.equal(b["label"].long(), plain["label"])
    buf = torch.empty(2, 3, 24, 24, dtype=torch.float16).to(memory_format=torch.channels_last)
    cl.load_state_dict({"epoch": 0, "position": 0})
    assert cl.next_into({"image": buf})["image"] is buf
    torch.testing.assert_close(buf, b["image"])
    cl.close()
    bf = stream(pngset, cfg, seed=8, image_dtype=torch.bfloat16)
    assert next(bf)["image"].dtype == torch.bfloat16
    bf.close()
    # switching mid-stream keeps the position
    sw = stream(pngset, cfg, seed=8)
    first = next(sw)
    sw.set_output(torch.float16, torch.uint8, channels_last=True)
    second = next(sw)
    ref = stream(pngset, cfg, seed=8)
    _take(ref, 1)
    r2 = next(ref)
    assert second["image"].dtype == torch.float16 and second["label"].dtype == torch.uint8
    torch.testing.assert_close(second["image"].float(), r2["image"], atol=2e-2, rtol=1e-2)
    assert torch.equal(first["label"], plain["label"]) and torch.equal(second["label"].long(), r2["label"])
    sw.close()
    ref.close()


def test_label_lut_cityscapes_labelids(tmp_path):
    """labelIds in the files, the (256,) LUT in DatasetInfo: outputs are trainIds."""
    from cps_fast.data.cityscapes_labels import labelid_to_trainid_lut
    lut = labelid_to_trainid_lut()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        raw = rng.integers(0, 34, (30, 40)).astype(np.uint8)
        raw = np.repeat(np.repeat(raw[::5, ::5], 5, 0), 5, 1)[:30, :40]
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(raw, "L").save(tmp_path / f"{i}_labelIds.png")
        samples.append(Sample(str(i), str(tmp_path / f"{i}.png"), str(tmp_path / f"{i}_labelIds.png")))
    info = DatasetInfo("cityscapes", 19, 255, tuple(str(i) for i in range(19)), voc_palette(19),
                       None, lut)
    cfg = cfg_for(crop_size=32, batch_size=2)
    s = _dali().DaliTrainStream(samples, info, cfg, 2, 0, "labeled", True, device="cpu")
    for _ in range(2):
        b = next(s)
        for k, (smp, p) in enumerate(zip(s.last_samples, s.last_params)):
            _, ref = reference(smp, p, cfg, info)
            lab = b["label"][k].numpy()
            m = interior(ref)
            assert (lab[m] == ref[m]).all()
            assert set(np.unique(lab)) <= set(range(19)) | {255}
    s.close()
    # validation: full resolution, exact
    val = list(_dali().iterate_val_dali(samples[:2], info, cfg, device="cpu"))
    for (img, lab, sid), smp in zip(val, samples):
        assert sid == smp.id and img.shape == (1, 3, 30, 40) and lab.dtype == torch.int64
        raw = np.asarray(Image.open(smp.label))
        assert np.array_equal(lab[0].numpy(), lut[raw])


def test_val_pipeline_matches_iterate_val(pngset):
    from cps_fast.data.loader import iterate_val
    cfg = cfg_for(num_workers=0)
    ref = list(iterate_val(pngset[:5], _info(), cfg))
    got = list(_dali().iterate_val_dali(pngset[:5], _info(), cfg, device="cpu"))
    assert len(got) == len(ref) == 5
    for (i1, l1, s1), (i2, l2, s2) in zip(got, ref):
        assert s1 == s2 and i1.shape == i2.shape and i1.dtype == i2.dtype
        assert torch.equal(l1, l2) and l1.dtype == torch.int64
        torch.testing.assert_close(i1, i2, atol=1e-5, rtol=1e-5)
    assert len(list(_dali().iterate_val_dali(pngset, _info(), cfg_for(val_max_images=2),
                                             device="cpu"))) == 2


# --------------------------------------------------------------------------- bad input


def _corrupt_png(src, dst):
    data = bytearray(open(src, "rb").read())
    i = data.find(b"IDAT") + 8
    data[i:i + 16] = bytes(16)  # bad zlib stream and CRC
    open(dst, "wb").write(bytes(data))


@pytest.mark.parametrize("kind", ["missing", "truncated_jpeg", "garbage", "corrupt_png",
                                  "corrupt_label", "size_mismatch", "rgb_label", "empty"])
def test_bad_file_fails_with_its_name(tmp_path, pngset, kind):
    samples = make_set(str(tmp_path), n=6, fmt="jpg")
    victim = samples[int(np.random.default_rng(0).integers(6))]
    bad = victim.image
    if kind == "missing":
        os.remove(bad)
    elif kind == "truncated_jpeg":
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) * 2 // 3])
    elif kind == "garbage":
        open(bad, "wb").write(b"not an image at all" * 10)
    elif kind == "empty":
        open(bad, "wb").close()
    elif kind == "corrupt_png":
        bad = victim.image[:-4] + ".png"
        _corrupt_png(pngset[0].image, bad)
        samples[samples.index(victim)] = Sample(victim.id, bad, victim.label)
    elif kind == "corrupt_label":
        bad = victim.label
        _corrupt_png(victim.label, bad)
    elif kind == "size_mismatch":
        bad = victim.label
        Image.fromarray(np.zeros((7, 9), np.uint8), "L").save(bad)
    elif kind == "rgb_label":
        bad = victim.label
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(bad)
    cfg = cfg_for(crop_size=16, batch_size=2)
    s = stream(samples, cfg, seed=0)
    with pytest.raises(DataError) as ei:
        for _ in range(4):  # 6 samples, batch 2: every sample within the first epoch
            next(s)
    assert bad in str(ei.value), str(ei.value)
    s.close()


def test_bad_file_after_good_batches_is_raised_at_its_batch(tmp_path):
    samples = make_set(str(tmp_path), n=8)
    cfg = cfg_for(crop_size=16, batch_size=2)
    probe = stream(samples, cfg, seed=1)
    order = probe.epoch_indices(0)
    probe.close()
    victim = samples[int(order[6])]  # in the 4th batch
    os.remove(victim.image)
    s = stream(samples, cfg, seed=1, prefetch=3)
    for _ in range(3):
        next(s)
    with pytest.raises(DataError, match=victim.image):
        next(s)
    assert s.state_dict() == {"epoch": 0, "position": 6}
    s.close()


# --------------------------------------------------------------------------- host helpers


def test_image_formats_dali_cannot_read_are_decoded_on_the_host(tmp_path):
    rng = np.random.default_rng(0)
    img, lab = _scene(rng, 30, 40)
    Image.fromarray(img).save(tmp_path / "a.gif")  # GIF: palette-quantised, flat colours
    _save_label(str(tmp_path / "a.png"), lab, "L")
    smp = [Sample("a", str(tmp_path / "a.gif"), str(tmp_path / "a.png"))]
    cfg = cfg_for(crop_size=32, batch_size=1)
    s = stream(smp, cfg, seed=0)
    b = next(s)
    ref_img, _ = reference(smp[0], s.last_params[0], cfg, _info())
    assert float(np.abs(b["image"][0].numpy() - ref_img).mean()) < 0.05
    s.close()


def test_palette_png_rewritten_as_grey_keeps_indices(tmp_path):
    from cps_fast.data.dali_host import label_for_dali, read_bytes
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 21, (13, 17)).astype(np.uint8)
    lab[0] = 255
    for mode in ("P", "L", "I;16"):
        p = str(tmp_path / f"l_{mode.replace(';', '')}.png")
        _save_label(p, lab, mode)
        data, h, w = label_for_dali(read_bytes(p), p, 21, 255)
        back = Image.open(io.BytesIO(data.tobytes()))
        assert back.mode == "L" and (h, w) == lab.shape
        assert np.array_equal(np.asarray(back), lab)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_mixed_decoder_matches_cpu(tmp_path):
    samples = make_set(str(tmp_path), n=8, fmt="jpg", size=(60, 90))
    cfg = cfg_for(crop_size=48, batch_size=4)
    cpu = stream(samples, cfg, seed=3)
    gpu = _dali().DaliTrainStream(samples, _info(), cfg, 4, 3, "labeled", True, device="cuda")
    for _ in range(3):
        a, b = next(cpu), next(gpu)
        assert b["image"].is_cuda and b["label"].is_cuda and b["label"].dtype == torch.int64
        assert float((a["image"] - b["image"].cpu()).abs().mean()) < 0.03  # nvJPEG vs libjpeg
        agree = (a["label"] == b["label"].cpu()).float().mean()
        assert agree > 0.98
    cpu.close()
    gpu.close()


@pytest.mark.gpu
def test_gpu_writes_into_buffers_on_the_step_stream(tmp_path):
    samples = make_set(str(tmp_path), n=6, size=(40, 60))
    cfg = cfg_for(crop_size=32, batch_size=2)
    s = _dali().DaliTrainStream(samples, _info(), cfg, 2, 0, "labeled", True, device="cuda",
                                channels_last=True)
    img = torch.empty(2, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    lab = torch.empty(2, 32, 32, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = s.next_into({"image": img, "label": lab}, stream=side)
    side.synchronize()
    assert out["image"] is img and out["label"] is lab
    ref = stream(samples, cfg, seed=0)
    r = next(ref)
    assert torch.equal(lab.cpu(), r["label"]) or (lab.cpu() == r["label"]).float().mean() > 0.98
    s.close()
    ref.close()


@pytest.mark.gpu
def test_gpu_val_pipeline(tmp_path):
    samples = make_set(str(tmp_path), n=3, size=(40, 60))
    cfg = cfg_for()
    for (i1, l1, _), (i2, l2, _) in zip(_dali().iterate_val_dali(samples, _info(), cfg, device="cuda"),
                                        _dali().iterate_val_dali(samples, _info(), cfg, device="cpu")):
        assert i1.is_cuda and torch.equal(l1.cpu(), l2)
        torch.testing.assert_close(i1.cpu(), i2, atol=1e-4, rtol=1e-4)
