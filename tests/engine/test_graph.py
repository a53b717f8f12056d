"""The fast path: CUDA-graph capture of the step (GPU) and its fallback (CPU)."""

import pytest
import torch

from cps_fast import presets
from cps_fast.engine.graph import GraphStep, make_step
from cps_fast.engine.optim import PolySGD
from cps_fast.engine.step import TrainStep
from cps_fast.engine.trainer import Trainer
from cps_fast.models import build_model


def _step(device, method="cps", amp="none", kernels="auto"):
    cfg = presets.get("synthetic", method).apply_overrides(
        ["model.aspp_channels=16", "model.decoder_channels=16", "model.low_level_channels=8",
         f"train.amp={amp}", f"train.kernels={kernels}", "optim.lr=0.02"])
    nets = []
    for i in range(2):
        torch.manual_seed(10 + i)
        nets.append(build_model(cfg.model, 6).to(device))
    opt = PolySGD(nets, cfg.optim, cfg.optim.lr, 100, device)
    return nets, TrainStep(nets, opt, cfg, 0, device, None)


def _batches(n, device, size=64):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        label = torch.randint(0, 6, (4, size // 8, size // 8), generator=g)
        label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)
        image = torch.randn(3, 6, generator=g)[:, label].permute(1, 0, 2, 3).contiguous()
        b = {"image": image, "label": label, "unlabeled": image.flip(-1).contiguous(),
             "unlabeled2": image.flip(-2).contiguous()}
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def test_fast_path_off_cuda_falls_back_with_a_reason():
    _, step = _step(torch.device("cpu"))
    said = []
    assert make_step(step, "fast", torch.device("cpu"), 1, say=said.append) is step
    assert len(said) == 1 and "no CUDA device" in said[0]
    assert make_step(step, "eager", torch.device("cpu"), 1, say=said.append) is step
    assert make_step(step, "fast", torch.device("cuda"), 2, say=said.append) is step
    assert "DDP" in said[-1]


def test_trainer_fast_path_on_cpu_runs_eagerly(make_config, tmp_path, capsys):
    trainer = Trainer(make_config("cps", **{"train.path": "fast"}), tmp_path / "r", quiet=True)
    assert isinstance(trainer.step_fn, TrainStep)
    assert "--path fast: no CUDA device" in capsys.readouterr().err
    trainer.run()


@pytest.mark.gpu
@pytest.mark.parametrize("method,amp,kernels", [("cps", "none", "torch"), ("cps", "bf16", "auto"),
                                                ("cps-cutmix", "bf16", "auto"),
                                                ("supervised", "none", "auto")])
def test_graph_replay_equals_eager_over_20_steps(method, amp, kernels):
    dev = torch.device("cuda")
    batches = _batches(20, dev)
    nets_e, eager = _step(dev, method, amp, kernels)
    nets_g, step_g = _step(dev, method, amp, kernels)
    graph = GraphStep(step_g, warmup=3)
    torch.manual_seed(0)
    le = [float(eager(b)["loss"]) for b in batches]
    torch.manual_seed(0)
    lg = [float(graph(b)["loss"]) for b in batches]
    assert graph.captured and graph.fallback_reason is None  # capture fails on any sync
    tol = 1e-4 if amp == "none" else 2e-2
    assert lg == pytest.approx(le, rel=tol, abs=tol)
    for pe, pg in zip([p for n in nets_e for p in n.parameters()],
                      [p for n in nets_g for p in n.parameters()]):
        assert torch.allclose(pe, pg, rtol=10 * tol, atol=10 * tol)
    assert int(step_g.optim.step_t) == 20


@pytest.mark.gpu
def test_graph_replay_after_resume_matches_uninterrupted(make_config, tmp_path):
    cfg = make_config("cps", **{"train.path": "fast", "train.device": "cuda",
                                "train.iters": 10, "train.kernels": "torch"})
    straight = Trainer(cfg, tmp_path / "a", quiet=True)
    straight.run()
    part = Trainer(cfg, tmp_path / "b", quiet=True)
    part.run(stop_at=5)
    resumed = Trainer(cfg, tmp_path / "b", resume="latest", quiet=True)
    resumed.run()
    assert isinstance(resumed.step_fn, GraphStep) and resumed.step_fn.captured
    for x, y in zip([p for n in straight.nets for p in n.parameters()],
                    [p for n in resumed.nets for p in n.parameters()]):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)
