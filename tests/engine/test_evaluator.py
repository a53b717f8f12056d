"""Evaluation: batched windows equal the window-by-window result, the protocol record, the
figures (a, b, ensemble) and the headline."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cps_fast import presets
from cps_fast.config import ConfigError, EvalConfig
from cps_fast.engine.evaluator import (check_select, eval_figures, evaluate, headline,
                                       inputs_per_image, predict_logits, predict_logits_many,
                                       protocol, protocol_str, sliding_logits)
from cps_fast.kernels.confusion_matrix import confusion_matrix_reference

C = 5


class _Counting(nn.Module):
    """A small conv net (zero padding: its output depends on where a window sits) that
    records the batch size of every forward."""

    def __init__(self, integer=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, C, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                if integer:   # integer weights and inputs: every sum exact, in any order
                    p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.conv2(torch.relu(self.conv1(x)))


def _window_by_window(net, image, cfg: EvalConfig):
    """The plain definition: every window (and its flip) through the network alone, the
    mean over the windows covering each pixel, the mean over scales."""
    n, _, h, w = image.shape
    out = torch.zeros(n, C, h, w)
    for s in cfg.scales:
        sh, sw = (h, w) if s == 1.0 else (max(1, round(h * s)), max(1, round(w * s)))
        x = image if (sh, sw) == (h, w) else F.interpolate(image, size=(sh, sw),
                                                           mode="bilinear", align_corners=True)
        crop = cfg.crop_size
        if cfg.mode == "sliding":
            ph, pw = max(sh, crop), max(sw, crop)
            x = F.pad(x, (0, pw - sw, 0, ph - sh))
            stride = math.ceil(crop * cfg.stride_rate)
            ys = sorted({min(y, ph - crop) for y in range(0, ph - crop + stride, stride)})
            xs = sorted({min(v, pw - crop) for v in range(0, pw - crop + stride, stride)})
        else:
            ph, pw, crop = sh, sw, None
            ys, xs = [0], [0]
        total = torch.zeros(n, C, ph, pw)
        count = torch.zeros(1, 1, ph, pw)
        for y0 in ys:
            for x0 in xs:
                win = x if crop is None else x[:, :, y0:y0 + crop, x0:x0 + crop]
                for flip in ((False, True) if cfg.flip else (False,)):
                    for k in range(n):                          # one image at a time
                        xi = win[k:k + 1]
                        o = net(xi.flip(-1)).flip(-1) if flip else net(xi)
                        total[k:k + 1, :, y0:y0 + o.shape[-2], x0:x0 + o.shape[-1]] += o
                    count[:, :, y0:y0 + win.shape[-2], x0:x0 + win.shape[-1]] += 1
        mean = (total / count)[:, :, :sh, :sw]
        if (sh, sw) != (h, w):
            mean = F.interpolate(mean, size=(h, w), mode="bilinear", align_corners=True)
        out += mean
    return out / len(cfg.scales)


CASES = [
    # (image sizes, eval config)
    ([(1, 37, 53)], dict(mode="sliding", crop_size=16)),                 # non-divisible
    ([(1, 10, 12)], dict(mode="sliding", crop_size=16)),                 # smaller than a window
    ([(2, 21, 40)], dict(mode="sliding", crop_size=16, flip=True)),      # 2 images, flip
    ([(1, 30, 25), (1, 9, 14), (1, 30, 25)],
     dict(mode="sliding", crop_size=16, stride_rate=0.5, flip=True,
          scales=(0.75, 1.0, 1.5))),                                     # sizes mixed, scales
    ([(1, 19, 23), (1, 19, 23), (1, 11, 23)],
     dict(mode="whole", flip=True, scales=(0.5, 1.0))),                  # whole image
]


@pytest.mark.parametrize("sizes,kw", CASES)
@pytest.mark.parametrize("max_batch", [1, 3, 64])
def test_batched_windows_equal_window_by_window(sizes, kw, max_batch):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{sizes}{kw}{max_batch}".encode()))
    images = [torch.randn(n, 3, h, w, generator=gen) for n, h, w in sizes]
    cfg = EvalConfig(max_batch=max_batch, **kw)
    net = _Counting().eval()
    with torch.no_grad():
        got = predict_logits_many(net, images, cfg, C)
        calls = list(net.calls)
        ref = [_window_by_window(net, im, cfg) for im in images]
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == torch.float32
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-5), (g - r).abs().max()
    # Batched as asked: every input once, at most max_batch (or one multi-image input) a call.
    expected = sum(im.shape[0] * inputs_per_image(im.shape[-2], im.shape[-1], cfg)
                   for im in images)
    assert sum(calls) == expected
    assert all(c <= max(max_batch, max(n for n, _, _ in sizes)) for c in calls)
    if cfg.mode == "sliding" and max_batch >= expected:
        assert len(calls) == 1, calls                      # every window in one forward


def test_single_image_helpers_agree():
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 29, 41, generator=gen)
    net = _Counting().eval()
    cfg = EvalConfig(mode="sliding", crop_size=16)
    with torch.no_grad():
        a = predict_logits(net, image, cfg, C)
        b = sliding_logits(net, image, 16, 2 / 3, C)
        r = _window_by_window(net, image, cfg)
    assert torch.allclose(a, r, rtol=1e-5, atol=1e-5) and torch.equal(a, b)


def _integer_batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(-3, 4, (1, 3, h, w), generator=gen).float()
        label = torch.randint(0, C, (1, h, w), generator=gen)
        label[torch.rand(1, h, w, generator=gen) < 0.2] = 255
        yield image, label, f"img{i}"


@pytest.mark.parametrize("kw", [dict(mode="sliding", crop_size=16, flip=True),
                                dict(mode="whole", flip=True)])
def test_evaluate_counts_every_figure_exactly(kw):
    """With integer weights and images every logit is exact, so the grouped, batched
    evaluation must give exactly the confusion matrices of the plain definition, for a, b
    and the ensemble (the mean of the two softmaxes)."""
    sizes = [(21, 30), (21, 30), (12, 9), (40, 17)]
    nets = {"a": _Counting(integer=True, seed=1), "b": _Counting(integer=True, seed=2)}
    expect = {k: torch.zeros(C, C, dtype=torch.int64) for k in ("a", "b", "ensemble")}
    cfg1 = EvalConfig(max_batch=1, **kw)
    with torch.no_grad():
        for image, label, _ in _integer_batches(sizes):
            la = _window_by_window(nets["a"], image, cfg1)
            lb = _window_by_window(nets["b"], image, cfg1)
            expect["a"] += confusion_matrix_reference(la, label, C)
            expect["b"] += confusion_matrix_reference(lb, label, C)
            expect["ensemble"] += confusion_matrix_reference(
                (la.softmax(1) + lb.softmax(1)) / 2, label, C)
    for max_batch in (1, 5, 64):
        cfg = EvalConfig(max_batch=max_batch, **kw)
        cms = evaluate(nets, _integer_batches(sizes), cfg, C, 255, torch.device("cpu"),
                       figures=["a", "b", "ensemble"], backend="torch")
        for k in expect:
            assert torch.equal(cms[k], expect[k]), (k, max_batch)
    assert int(expect["a"].sum()) > 0


def test_evaluate_progress_and_training_mode_restored():
    nets = {"a": _Counting(integer=True).train()}
    seen = []
    cfg = EvalConfig(mode="sliding", crop_size=16, max_batch=2)
    cms = evaluate(nets, _integer_batches([(20, 20)] * 5), cfg, C, 255, torch.device("cpu"),
                   progress=seen.append)
    assert list(cms) == ["a"] and seen[-1] == 5 and seen == sorted(seen)
    assert nets["a"].training


# ----------------------------------------------------------------------------- figures
def test_figures_and_select():
    assert eval_figures("all", 2) == ["a", "b", "ensemble"]
    assert eval_figures("all", 1) == ["a"]
    assert eval_figures("both", 2) == ["a", "b"]
    assert eval_figures("ensemble", 2) == ["ensemble"]
    with pytest.raises(ConfigError, match="one network"):
        eval_figures("b", 1)
    check_select("a", ["a", "b"], "both")
    check_select("max", ["b"], "b")
    with pytest.raises(ConfigError, match="eval.select=a.*eval.network=b"):
        check_select("a", ["b"], "b")
    mious = {"a": 0.5, "b": 0.7, "ensemble": 0.6}
    assert headline(mious, "a") == "a" and headline(mious, "max") == "b"
    assert headline(mious, "ensemble") == "ensemble"
    with pytest.raises(ConfigError, match="eval.select"):
        EvalConfig(select="best")
    with pytest.raises(ConfigError, match="eval.network"):
        EvalConfig(network="c")
    with pytest.raises(ConfigError, match="eval.max_batch"):
        EvalConfig(max_batch=0)


@pytest.mark.parametrize("name,text", [
    ("synthetic", "whole image, no flip, scale 1, 7 images"),
    ("voc_r50_1-8", "sliding 512/342, no flip, scale 1, 7 images"),
    ("city_r50_1-8", "sliding 800/534, no flip, scale 1, 7 images"),
])
def test_protocol_of_each_preset(name, text):
    cfg = presets.get(name).eval
    p = protocol(cfg, ["a", "b", "ensemble"], 7)
    assert protocol_str(p) == text
    assert p["mode"] == cfg.mode and p["select"] == "a" and p["figures"] == ["a", "b", "ensemble"]
    assert "mean of the softmax" in p["ensemble"]
    if cfg.mode == "sliding":
        assert p["crop"] == cfg.crop_size and p["stride"] == math.ceil(cfg.crop_size * 2 / 3)
    multi = EvalConfig(mode="sliding", crop_size=800, flip=True, scales=(0.75, 1.0, 1.25))
    assert protocol_str(protocol(multi, ["a"])) == "sliding 800/534, flip, scales 0.75,1,1.25"
