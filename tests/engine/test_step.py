"""The step function on its own: both methods learn, statistics, non-finite skipping."""

import math

import pytest
import torch

from cps_fast import presets
from cps_fast.engine.optim import PolySGD
from cps_fast.engine.step import TrainStep
from cps_fast.models import build_model

C = 6


def _setup(method, **sets):
    cfg = presets.get("synthetic", method).apply_overrides(
        ["model.aspp_channels=16", "model.decoder_channels=16", "model.low_level_channels=8",
         "optim.lr=0.01"] + [f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    nets = [build_model(cfg.model, C) for _ in range(1 if method == "supervised" else 2)]
    opt = PolySGD(nets, cfg.optim, cfg.optim.lr, 1000, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0) if method == "cps-cutmix" else None
    return cfg, nets, TrainStep(nets, opt, cfg, 0, torch.device("cpu"), gen)


def _batch(n=4, size=32):
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, C, (n, size // 8, size // 8), generator=g)
    label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)
    image = torch.randn(3, C, generator=g)[:, label].permute(1, 0, 2, 3).contiguous()
    image = image + 0.1 * torch.randn(image.shape, generator=g)
    label[:, :2] = 255  # some ignored pixels
    return {"image": image, "label": label, "unlabeled": image.flip(-1).clone(),
            "unlabeled2": image.flip(-2).clone()}


@pytest.mark.parametrize("method", ["cps", "cps-cutmix", "supervised"])
def test_a_few_steps_lower_the_loss(method):
    torch.set_num_threads(1)
    _, nets, step = _setup(method)
    batch = _batch()
    first = step(batch)
    # CPS pseudo-labels are argmaxes, so early steps are sensitive to rounding (backends
    # differ in summation order); over 24 steps at a moderate lr the loss falls for all.
    for _ in range(24):
        out = step(batch)
    assert torch.isfinite(first["loss"]) and torch.isfinite(out["loss"])
    assert float(out["sup_a"]) < float(first["sup_a"]) * 0.85
    if method != "supervised":
        assert float(out["sup_b"]) < float(first["sup_b"]) * 0.85
        total_lab, total_unl = int(out["stats"][1]), int(out["stats"][3])
        assert out["stats"].dtype == torch.int64
        assert 0 <= int(out["stats"][0]) <= total_lab and 0 <= int(out["stats"][2]) <= total_unl
    else:
        assert float(out["cps"]) == 0.0


def test_cps_loss_matches_hand_assembly():
    """loss = sup_a + sup_b + lambda * cps with the reference ops, on one forward."""
    cfg, nets, step = _setup("cps", **{"loss.cps_rampup": 0})  # lambda constant
    batch = _batch()
    out = {k: v.detach() for k, v in step.losses(batch).items()}
    assert float(out["loss"]) == pytest.approx(
        float(out["sup_a"] + out["sup_b"] + cfg.loss.cps_weight * out["cps"]), rel=1e-6)
    # Labeled stats count only the labeled half (4 images of 32x32 at most).
    assert int(out["stats"][1]) <= 4 * 32 * 32 and int(out["stats"][3]) <= 4 * 32 * 32


@pytest.mark.parametrize("method,sets", [
    ("cps", {}), ("supervised", {"loss.supervised": "ohem", "loss.ohem_min_kept": 200}),
    ("cps", {"train.amp": "fp16"})])
def test_nonfinite_step_changes_nothing(method, sets):
    """A NaN pixel: the update is skipped, and neither the weights, the momentum nor the
    BatchNorm running statistics (which the forward had already moved) keep any trace of it.
    With OHEM the loss itself stays finite (NaN <= thresh is false, so the pixel is dropped,
    as in the official selection) while BN's backward spreads the NaN: the gradient check
    catches it."""
    _, nets, step = _setup(method, **sets)
    batch = _batch()
    step(batch)
    state = lambda: [t.detach().clone() for n in nets for k, t in n.state_dict().items()
                     if not k.endswith("num_batches_tracked")] + [
        s["momentum_buffer"].clone() for s in step.optim.optimizer.state.values()]
    before = state()
    bad = dict(batch, image=batch["image"].clone())
    bad["image"][0, 0, 0, 0] = float("nan")
    out = step(bad)
    assert float(out["nonfinite"]) == 1.0
    after = state()
    assert len(before) == len(after)
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    out = step(batch)
    assert float(out["nonfinite"]) == 0.0 and torch.isfinite(out["loss"])
    assert all(torch.isfinite(t).all() for t in state())


def test_bf16_autocast_step_is_finite():
    _, _, step = _setup("cps", **{"train.amp": "bf16"})
    out = step(_batch())
    assert torch.isfinite(out["loss"]) and float(out["nonfinite"]) == 0.0


def test_cps_rampup_follows_the_device_step_counter():
    _, _, step = _setup("cps", **{"loss.cps_rampup": 100})
    assert step.objective.step_t is step.optim.step_t
    lam = lambda: step.objective.cps_lambda(step.objective.step_t)  # noqa: E731
    assert float(lam()) == pytest.approx(1.5 * math.exp(-5.0))
    step.optim.step_t.fill_(50)
    assert float(lam()) == pytest.approx(1.5 * math.exp(-5.0 * 0.25))
    step.optim.step_t.fill_(400)
    assert float(lam()) == pytest.approx(1.5)
    _, _, flat = _setup("cps", **{"loss.cps_rampup": 0})  # no ramp-up: the constant
    assert flat.objective.cps_lambda(flat.optim.step_t) == 1.5
