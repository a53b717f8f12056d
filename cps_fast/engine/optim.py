"""SGD with the paper's parameter groups and a poly learning rate held on the device.

The learning rate is one 0-dim tensor shared by every parameter group. The poly schedule
advances it on the device from a device-side step counter, so the same code runs inside a
captured CUDA graph (nothing the host computes per step), and the fused SGD kernel reads the
tensor directly: no ``.item()``. Where fused SGD is unavailable (old torch on some devices)
the plain loop implementation is used with a float lr set from the host-side step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(models: list[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups over all models: weights of conv/linear layers with weight decay; BN/norm
    parameters and biases without (as the official code's ``group_weight``)."""
    decay, no_decay = [], []
    for model in models:
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if isinstance(module, _NORM_TYPES) or name == "bias":
                    no_decay.append(p)
                else:
                    decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def poly_factor(step: torch.Tensor, total: int, power: float) -> torch.Tensor:
    """(1 - step / total) ** power, clamped at 0, computed in fp32 on step's device."""
    frac = 1.0 - step.to(torch.float32) / float(max(total, 1))
    return frac.clamp_min(0.0).pow(power)


class PolySGD:
    """SGD (momentum, weight decay on conv/linear weights) + poly schedule, lr on the device.

    ``step()`` applies the update with the lr of the current step, then advances the device
    step counter and the lr. ``found_inf`` (a device tensor, 1.0 = skip) makes the fused
    kernel skip the update entirely, so a non-finite step never touches the parameters.
    """

    def __init__(self, models: list[nn.Module], cfg: OptimConfig, base_lr: float,
                 total_iters: int, device: torch.device):
        self.base_lr = float(base_lr)
        self.total_iters = int(total_iters)
        self.power = cfg.poly_power
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)
        self.lr_t = torch.full((), self.base_lr, dtype=torch.float32, device=device)
        groups = param_groups(models, cfg.weight_decay)
        self.fused = _fused_sgd_supported(device)
        lr = self.lr_t if self.fused else self.base_lr
        kw = {"fused": True} if self.fused else {}
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                                         nesterov=False, **kw)
        self._host_step = 0  # only used by the non-fused fallback
        self._init_momentum()

    def _init_momentum(self) -> None:
        """Zero momentum buffers for every parameter, before the first step.

        torch's SGD creates them lazily in its first step, and the fused kernel allocates
        them with ``empty_like`` and fills them only when that step is applied: a skipped
        first step (``found_inf``: every fp16 run skips its first steps while the loss scale
        settles) would leave uninitialised memory as momentum. Zeros are exactly the lazy
        first step (dampening 0: buf = 0 * m + g = g), and they make the optimiser state
        exist before a CUDA graph is captured."""
        for group in self.optimizer.param_groups:
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                state = self.optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)

    def zero_grad(self) -> None:
        # set_to_none=False keeps gradient buffers allocated between steps (CUDA graphs).
        self.optimizer.zero_grad(set_to_none=False)

    def step(self, found_inf: torch.Tensor | None = None) -> None:
        if self.fused:
            # The fused kernel reads these attributes (as GradScaler sets them).
            self.optimizer.found_inf = found_inf
            self.optimizer.grad_scale = None
            self.optimizer.step()
        else:
            lr = self.base_lr * max(0.0, 1.0 - self._host_step / max(self.total_iters, 1)) ** self.power
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if found_inf is not None:
                # Fallback path only: deciding to skip needs the host (documented sync).
                if bool(found_inf.item()):
                    self._advance()
                    return
            self.optimizer.step()
        self._advance()

    def _advance(self) -> None:
        self._host_step += 1
        self.step_t.add_(1)
        self.lr_t.copy_(self.base_lr * poly_factor(self.step_t, self.total_iters, self.power))

    def set_step(self, step: int) -> None:
        """Position the schedule at ``step`` (resume)."""
        self._host_step = int(step)
        self.step_t.fill_(int(step))
        self.lr_t.copy_(self.base_lr * poly_factor(self.step_t, self.total_iters, self.power))

    def state_dict(self) -> dict:
        # Host sync (checkpoint time only): the device counter is the truth, since a
        # replayed CUDA graph advances it without running this Python code.
        step = int(self.step_t.item()) if self.fused else self._host_step
        return {"optimizer": self.optimizer.state_dict(), "step": step}

    def load_state_dict(self, d: dict) -> None:
        self.optimizer.load_state_dict(d["optimizer"])
        self._init_momentum()  # a checkpoint from before the first step has none
        if self.fused:
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_t  # state_dict stores a copy; re-share the device tensor
        self.set_step(d["step"])


def _fused_sgd_supported(device: torch.device) -> bool:
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.ones(2, device=device)
        opt = torch.optim.SGD([p], lr=torch.tensor(0.1, device=device), momentum=0.9,
                              fused=True)
        opt.step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False
