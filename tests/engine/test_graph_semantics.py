"""GraphStep and the step's graph-safety on the CPU, through an op-recording stand-in for
CUDA-graph capture (graph_emulator.py): the recorded step, replayed with every host-side
value frozen, must train exactly as the eager step does, and must contain nothing a capture
would refuse. The same checks on a real graph are the gpu-marked tests in test_graph.py."""

import pytest
import torch

from cps_fast import ops, presets
from cps_fast.engine.graph import GraphStep
from cps_fast.engine.optim import PolySGD
from cps_fast.engine.step import TrainStep
from cps_fast.models import build_model
from graph_emulator import OpRecordingCapture

CPU = torch.device("cpu")


def _step(method, kernels, supervised="ce", amp="none", rampup=0, total=12):
    cfg = presets.get("synthetic", method).apply_overrides(
        ["model.aspp_channels=8", "model.decoder_channels=8", "model.low_level_channels=8",
         f"train.amp={amp}", f"train.kernels={kernels}", f"loss.supervised={supervised}",
         "loss.ohem_min_kept=200", f"loss.cps_rampup={rampup}", "optim.lr=0.05"])
    nets = []
    for i in range(1 if method == "supervised" else 2):
        torch.manual_seed(10 + i)
        nets.append(build_model(cfg.model, 6))
    opt = PolySGD(nets, cfg.optim, cfg.optim.lr, total, CPU)
    gen = torch.Generator().manual_seed(7) if method == "cps-cutmix" else None
    return nets, TrainStep(nets, opt, cfg, 0, CPU, gen), gen


def _batches(n, size=32, seed=0, nan_at=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(0, 6, (2, size // 8, size // 8), generator=g)
        label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)
        label[:, :3] = 255  # ignored pixels
        image = torch.randn(3, 6, generator=g)[:, label.clamp_max(5)].permute(1, 0, 2, 3)
        image = image + 0.3 * torch.randn(image.shape, generator=g)
        if len(out) in nan_at:
            image[0, 0, 0, 0] = float("nan")  # a non-finite loss: the step must be skipped
        out.append({"image": image.contiguous(), "label": label,
                    "unlabeled": torch.randn(2, 3, size, size, generator=g),
                    "unlabeled2": torch.randn(2, 3, size, size, generator=g)})
    return out


@pytest.fixture(autouse=True)
def _no_cpu_value_checks(monkeypatch):
    # The label-value check reads the target on the host; it runs on CPU tensors only, so
    # it is off here to keep the step what it is on the GPU.
    monkeypatch.setenv("CPS_FAST_CHECK_VALUES", "0")


CASES = [("cps", "torch", "ce", "none", 0), ("cps", "torch", "ohem", "none", 4),
         ("cps-cutmix", "torch", "ce", "none", 0), ("supervised", "torch", "ohem", "none", 0),
         ("cps", "torch", "ce", "bf16", 0), ("cps", "torch", "ce", "fp16", 0),
         ("cps", "triton", "ohem", "none", 0),
         ("cps-cutmix", "triton", "ce", "none", 0), ("cps", "cpp", "ohem", "none", 4)]


@pytest.mark.parametrize("method,kernels,supervised,amp,rampup", CASES)
def test_recorded_step_replays_like_the_eager_step(method, kernels, supervised, amp, rampup):
    if not ops.implements("cps_loss", kernels):
        pytest.skip(f"backend {kernels} is not built here")
    steps = 8
    batches = _batches(steps, nan_at=(5,))
    nets_e, eager, gen_e = _step(method, kernels, supervised, amp, rampup)
    nets_g, inner, gen_g = _step(method, kernels, supervised, amp, rampup)
    capture = OpRecordingCapture()
    fast = GraphStep(inner, warmup=2, capture=capture)
    torch.manual_seed(0)
    le = [eager(b) for b in batches]
    torch.manual_seed(0)
    lg = []
    for b in batches:
        out = fast(b)
        lg.append({k: v.clone() for k, v in out.items()})  # replays rewrite the outputs
    assert fast.captured and fast.fallback_reason is None
    assert capture.hazards == [], "\n".join(capture.hazards)
    for k in ("loss", "sup_a", "sup_b", "cps"):
        got = torch.stack([o[k].double() for o in lg])
        want = torch.stack([o[k].double() for o in le])
        assert torch.isnan(got[5]) == torch.isnan(want[5])
        keep = torch.arange(steps) != 5
        assert torch.isfinite(got[keep]).all()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-6, msg=k)
    assert [float(o["nonfinite"]) for o in lg] == [float(o["nonfinite"]) for o in le]
    assert float(lg[5]["nonfinite"]) == 1.0
    assert all(torch.equal(a["stats"], b["stats"]) for a, b in zip(le, lg))
    # The schedule advanced on the device through the replays, and the weights followed.
    assert int(inner.optim.step_t) == int(eager.optim.step_t) == steps
    assert float(inner.optim.lr_t) == pytest.approx(float(eager.optim.lr_t))
    for pe, pg in zip([p for n in nets_e for p in n.parameters()],
                      [p for n in nets_g for p in n.parameters()]):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-6)
    for be, bg in zip([b for n in nets_e for b in n.buffers()],
                      [b for n in nets_g for b in n.buffers()]):
        torch.testing.assert_close(bg, be, rtol=1e-4, atol=1e-6)


def test_a_step_that_keeps_state_on_the_host_replays_wrongly():
    """The emulator freezes host values as a graph does: the non-fused optimiser (Python
    lr from a host step counter, skip decided with .item()) must be caught."""
    _, inner, _ = _step("cps", "torch")
    inner.optim.fused = False  # the host-side fallback: lr is a Python float per step
    for g in inner.optim.optimizer.param_groups:
        g["lr"] = inner.optim.base_lr
        g["fused"] = False
    capture = OpRecordingCapture()
    fast = GraphStep(inner, warmup=1, capture=capture)
    for b in _batches(3):
        fast(b)
    assert any("_local_scalar_dense" in h for h in capture.hazards)


def test_a_host_branch_is_frozen_by_the_replay():
    """A Python decision taken at capture time is replayed as taken: the point of keeping
    the learning rate on the device. Here the lr is set from the host before each call;
    the replays keep using the captured one, so the weights diverge from eager."""
    nets_e, eager, _ = _step("supervised", "torch")
    nets_g, inner, _ = _step("supervised", "torch")
    for s in (eager, inner):
        s.optim.fused = False
        for g in s.optim.optimizer.param_groups:
            g["fused"] = False
    fast = GraphStep(inner, warmup=1, capture=OpRecordingCapture())
    for b in _batches(6):
        eager(b)
        fast(b)
    diff = max((pe - pg).abs().max().item() for pe, pg in zip(
        [p for n in nets_e for p in n.parameters()], [p for n in nets_g for p in n.parameters()]))
    assert diff > 1e-6


def test_graph_step_refuses_a_changed_batch_shape():
    _, inner, _ = _step("supervised", "torch")
    fast = GraphStep(inner, warmup=1, capture=OpRecordingCapture())
    b = _batches(1)[0]
    fast(b)
    small = {k: v[:1] for k, v in b.items()}
    with pytest.raises(ValueError, match="differs from the captured"):
        fast(small)


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_the_trainer_through_a_recorded_graph_trains_as_the_eager_trainer(
        make_config, tmp_path, loader):
    """The trainer's fast-path plumbing on the CPU: batches staged into the static buffers
    (with DALI: written there by ``next_into``, no copy), warm-up, capture, replays, the
    metrics accumulated from the replayed outputs, the checkpoint read from the device
    counter. Same weights and same logged losses as the eager trainer."""
    from cps_fast.engine.trainer import Trainer
    from cps_fast.runlog import read_metrics
    cfg = make_config("cps", **{"data.loader": loader, "train.iters": 6})
    eager = Trainer(cfg, tmp_path / "e", quiet=True)
    eager.run()
    fast = Trainer(cfg, tmp_path / "f", quiet=True)
    fast.step_fn = GraphStep(fast.step_fn, warmup=2, capture=OpRecordingCapture())
    direct = []
    real_into = fast._next_batch_into
    fast._next_batch_into = lambda bufs: direct.append(1) or real_into(bufs)
    fast.run()
    assert fast.step_fn.captured and fast.step_fn.fallback_reason is None
    assert len(direct) == (5 if loader == "dali" else 0)  # every call after the first
    for x, y in zip([p for n in eager.nets for p in n.parameters()],
                    [p for n in fast.nets for p in n.parameters()]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    train = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["kind"] == "train"]
    got, want = train(tmp_path / "f"), train(tmp_path / "e")
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)
    saved = torch.load(tmp_path / "f" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 6 and saved["optim"]["step"] == 6  # the device counter


class _RefusingCapture(OpRecordingCapture):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_failed_capture_falls_back_to_the_eager_step_with_one_line():
    batches = _batches(5)
    nets_e, eager, _ = _step("cps", "torch")
    nets_g, inner, _ = _step("cps", "torch")
    said = []
    fast = GraphStep(inner, warmup=2, capture=_RefusingCapture(), on_fallback=said.append)
    le = [float(eager(b)["loss"]) for b in batches]
    lg = [float(fast(b)["loss"]) for b in batches]
    assert not fast.captured
    assert said == ["CUDA graph capture failed (RuntimeError: operation not permitted when "
                    "stream is capturing); eager step"]
    assert lg == pytest.approx(le, rel=1e-6)  # no step lost or repeated around the failure
    assert int(inner.optim.step_t) == 5
