import math

import pytest
import torch
from torch import nn

from cps_fast.config import OptimConfig
from cps_fast.engine.optim import PolySGD, param_groups


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_param_groups_no_decay_on_bn_and_bias():
    net = _net()
    decay, no_decay = param_groups([net], 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert ids == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight),
                                                    id(net[1].bias), id(net[3].bias)}


def test_poly_schedule_advances_on_device():
    net = _net()
    opt = PolySGD([net], OptimConfig(), base_lr=0.01, total_iters=10, device=torch.device("cpu"))
    seen = []
    for _ in range(10):
        seen.append(float(opt.lr_t))
        net(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
    expected = [0.01 * (1 - i / 10) ** 0.9 for i in range(10)]
    assert seen == pytest.approx(expected, rel=1e-6)
    assert int(opt.step_t) == 10 and float(opt.lr_t) == 0.0


def test_found_inf_skips_the_update_entirely():
    torch.manual_seed(0)
    net = _net()
    opt = PolySGD([net], OptimConfig(), base_lr=0.1, total_iters=100, device=torch.device("cpu"))
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()  # creates momentum buffers
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step(found_inf=torch.ones(()))
    for b, p in zip(before, net.parameters()):
        assert torch.equal(b, p)
    opt.step(found_inf=torch.zeros(()))
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_state_round_trip_restores_schedule():
    net = _net()
    opt = PolySGD([net], OptimConfig(), 0.01, 20, torch.device("cpu"))
    for _ in range(5):
        net(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
    sd = opt.state_dict()
    opt2 = PolySGD([net], OptimConfig(), 0.01, 20, torch.device("cpu"))
    opt2.load_state_dict(sd)
    assert float(opt2.lr_t) == pytest.approx(0.01 * (1 - 5 / 20) ** 0.9)
    assert all(g["lr"] is opt2.lr_t for g in opt2.optimizer.param_groups) or not opt2.fused
    assert not math.isnan(float(opt2.lr_t))


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_first_step_leaves_no_garbage_momentum(fused):
    """fp16 runs skip their first steps while the loss scale settles; torch's fused SGD
    allocated its momentum with empty_like in such a step and never filled it. After a
    skipped first step, the next applied step must equal a plain first SGD step."""
    torch.manual_seed(0)
    net, ref = _net(), _net()
    ref.load_state_dict(net.state_dict())
    cpu = torch.device("cpu")
    opt = PolySGD([net], OptimConfig(), 0.1, 100, cpu)
    if not fused:
        opt.fused = False
        for g in opt.optimizer.param_groups:
            g["fused"], g["lr"] = False, 0.1
    x = torch.randn(2, 3, 8, 8)
    # Poison the allocator's free memory so that an uninitialised buffer shows.
    junk = [torch.full_like(p, 1e30) for p in net.parameters()]
    del junk
    net(x).sum().backward()
    opt.step(found_inf=torch.ones(()))          # skipped
    opt.set_step(0)
    opt.zero_grad()
    net(x).sum().backward()
    opt.step(found_inf=torch.zeros(()))         # the first applied step
    plain = torch.optim.SGD(param_groups([ref], OptimConfig().weight_decay), lr=0.1,
                            momentum=OptimConfig().momentum)
    ref(x).sum().backward()
    plain.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # and every momentum buffer exists from construction (graph capture needs no lazy state)
    fresh = PolySGD([_net()], OptimConfig(), 0.1, 100, cpu)
    assert all(fresh.optimizer.state[p]["momentum_buffer"] is not None
               for g in fresh.optimizer.param_groups for p in g["params"])
