"""One training iteration of CPS, CPS + CutMix or the supervised baseline.

``TrainStep`` is the single step function both paths use: the eager path calls it
directly; the fast path (CUDA graph) captures the very same call. It therefore never
synchronises the host with the device: losses and statistics come back as device
tensors, a non-finite loss or gradient skips the optimiser update on the device
(``found_inf``) and restores the BatchNorm running statistics its forward pass had already
moved, and the CutMix masks are drawn from a device generator.

``CPSObjective.forward`` draws the CutMix masks (the only random numbers of a step) and
then calls ``compute``, a pure function of the batch, the masks and the device step counter:
the part the fast path hands to ``torch.compile`` (``compiled.py``), so that the masks stay
the eager ones, from the run's generator, and nothing random is traced.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from .. import ops
from ..config import Config
from ..kernels.cps_loss import agreement_stats
from .cutmix import box_masks, mix
from .optim import PolySGD

METRIC_KEYS = ("loss", "sup_a", "sup_b", "cps", "nonfinite")


class CPSObjective(nn.Module):
    """The forward passes of the networks and the losses of one iteration, as one module.

    One module, so that DistributedDataParallel wraps the whole iteration: each network is
    called several times (labeled, unlabeled, teacher passes) but DDP sees one forward and
    one backward, and reduces the gradients of both networks in one process group.
    """

    def __init__(self, nets: list[nn.Module], cfg: Config, background_index: Optional[int],
                 cutmix_generator: Optional[torch.Generator] = None):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.method = cfg.train.method
        self.cps_weight = cfg.loss.cps_weight
        self.cps_rampup = cfg.loss.cps_rampup
        self.step_t: Optional[torch.Tensor] = None  # the optimiser's device step counter
        self.loss_cfg = cfg.loss
        self.ignore_index = cfg.data.ignore_index
        self.backend = cfg.train.kernels
        self.background_index = background_index
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16,
                          "fp16": torch.float16}[cfg.train.amp]
        self.channels_last = cfg.model.channels_last
        # None: the device's default generator (what a captured CUDA graph tracks).
        self.generator = cutmix_generator
        # What forward calls after drawing the masks: ``compute`` itself (eager), or its
        # torch.compile'd version (set by compiled.CompiledStep).
        self.compute_fn: Callable = self.compute

    # ------------------------------------------------------------------ helpers
    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        if ops._is_compiling():
            # Traced: the casts become graph ops (Inductor CSEs a weight's repeated cast),
            # so the weight cache is not needed, and no capture query is traced.
            return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)
        # The autocast weight cache must not outlive a graph capture.
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=not capturing)

    def _fwd(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x)

    def _sup(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_cfg.supervised == "ohem":
            return ops.ohem_cross_entropy(logits, target, self.loss_cfg.ohem_thresh,
                                          self.loss_cfg.ohem_min_kept, self.ignore_index,
                                          backend=self.backend)
        return ops.cross_entropy(logits, target, self.ignore_index, backend=self.backend)

    def cps_lambda(self, step_t: Optional[torch.Tensor]):
        """lambda, or lambda * exp(-5 (1 - t)^2) with t = step / rampup (the Mean-Teacher
        sigmoid ramp-up), computed on the device from the step counter: graph-safe."""
        if self.cps_rampup <= 0 or step_t is None:
            return self.cps_weight
        t = (step_t.to(torch.float32) / self.cps_rampup).clamp(0.0, 1.0)
        return self.cps_weight * torch.exp(-5.0 * (1.0 - t) ** 2)

    def load_backends(self, device: torch.device) -> None:
        """Import the loss backends this objective calls now (``ops`` loads them lazily, on
        first use): an import cannot be traced, so the compiled path does this first."""
        used = ["cross_entropy"]
        if self.loss_cfg.supervised == "ohem":
            used.append("ohem_cross_entropy")
        if self.method == "cps":
            used.append("cps_loss")
        for op in used:
            ops.resolve(op, self.backend, device.type)

    def draw_mask(self, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The CutMix box masks of this step (None unless cps-cutmix), from the generator."""
        if self.method != "cps-cutmix":
            return None
        n, _, h, w = batch["unlabeled"].shape
        return box_masks(n, h, w, self.generator, batch["unlabeled"].device)

    # ------------------------------------------------------------------ losses
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward pass and the losses (no backward); all values are device tensors."""
        return self.compute_fn(batch, self.draw_mask(batch), self.step_t)

    def compute(self, batch: dict[str, torch.Tensor], mask: Optional[torch.Tensor],
                step_t: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The networks and the losses given this step's CutMix masks and step counter:
        deterministic, host-sync free, traceable whole by torch.compile (fullgraph)."""
        img, label = batch["image"], batch["label"]
        device = img.device
        zero = torch.zeros((), device=device)
        stats = torch.zeros(4, dtype=torch.int64, device=device)
        with self._autocast(device):
            if self.method == "supervised":
                sup_a = self._sup(self._fwd(self.nets[0], img), label)
                return {"loss": sup_a, "sup_a": sup_a, "sup_b": zero, "cps": zero,
                        "stats": stats}
            net_a, net_b = self.nets
            if self.method == "cps":
                uimg = batch["unlabeled"]
                la, ua = self._fwd(net_a, img), self._fwd(net_a, uimg)
                lb, ub = self._fwd(net_b, img), self._fwd(net_b, uimg)
                sup_a, sup_b = self._sup(la, label), self._sup(lb, label)
                is_labeled = torch.cat([
                    torch.ones(img.shape[0], dtype=torch.bool, device=device),
                    torch.zeros(uimg.shape[0], dtype=torch.bool, device=device)])
                cps, stats = ops.cps_loss(torch.cat([la, ua]), torch.cat([lb, ub]),
                                          is_labeled=is_labeled,
                                          background_index=self.background_index,
                                          backend=self.backend)
            else:  # cps-cutmix: CPS on the mixed unlabeled images only
                u0, u1 = batch["unlabeled"], batch["unlabeled2"]
                with torch.no_grad():
                    # Teachers: each network on both unmixed images, logits mixed with
                    # the same mask; their argmax supervises the *other* network.
                    t_a = mix(self._fwd(net_a, u0), self._fwd(net_a, u1), mask)
                    t_b = mix(self._fwd(net_b, u0), self._fwd(net_b, u1), mask)
                    pseudo_a, pseudo_b = t_a.argmax(1), t_b.argmax(1)
                    stats = agreement_stats(pseudo_a, pseudo_b, None, None,
                                            self.background_index)
                umix = mix(u0, u1, mask)
                sa, sb = self._fwd(net_a, umix), self._fwd(net_b, umix)
                cps = (ops.cross_entropy(sa, pseudo_b, self.ignore_index, backend=self.backend)
                       + ops.cross_entropy(sb, pseudo_a, self.ignore_index,
                                           backend=self.backend))
                la, lb = self._fwd(net_a, img), self._fwd(net_b, img)
                sup_a, sup_b = self._sup(la, label), self._sup(lb, label)
            loss = sup_a + sup_b + self.cps_lambda(step_t) * cps
        return {"loss": loss, "sup_a": sup_a, "sup_b": sup_b, "cps": cps, "stats": stats}


class TrainStep:
    """One iteration: the objective's forward, one backward, the optimiser step.

    ``wrap`` (e.g. DistributedDataParallel) wraps the objective; ``reduce_flag`` makes the
    non-finite flag global across ranks (a device collective, no host sync), so that every
    rank skips the same steps.
    """

    def __init__(self, nets: list[nn.Module], optim: PolySGD, cfg: Config,
                 background_index: Optional[int], device: torch.device,
                 cutmix_generator: Optional[torch.Generator] = None,
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
                 reduce_flag: Optional[Callable[[torch.Tensor], None]] = None):
        self.nets = nets
        self.optim = optim
        self.device = device
        self.method = cfg.train.method
        self.objective = CPSObjective(nets, cfg, background_index, cutmix_generator)
        self.objective.step_t = optim.step_t
        self.module = wrap(self.objective) if wrap is not None else self.objective
        self.reduce_flag = reduce_flag
        self.amp_dtype = self.objective.amp_dtype
        self.scaler = DeviceLossScaler(device) if self.amp_dtype is torch.float16 else None
        self.bn_guard = RunningStatsGuard(nets)
        self._one = torch.ones((), dtype=torch.float32, device=device)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.module(batch)

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for net in self.nets:
            net.train()
        self.optim.zero_grad()
        self.bn_guard.save()
        out = self.losses(batch)
        loss = out["loss"].float()
        bad = (~torch.isfinite(loss)).to(torch.float32)
        if self.scaler is not None:
            (loss * self.scaler.scale).backward()
            # fp16 gradient overflow is the scaler's business (shrink the scale, skip the
            # update), not a non-finite loss to report.
            overflow = self.scaler.unscale_(self.nets)
        else:
            loss.backward()
            # A finite loss can still come with non-finite gradients: a NaN pixel that the
            # OHEM selection drops (NaN <= thresh is false) still spreads through BN's
            # backward. Reading every gradient once costs ~0.1% of a step.
            bad = torch.clamp_max(bad + self._grads_nonfinite(), 1.0)
            overflow = None
        if self.reduce_flag is not None:
            self.reduce_flag(bad)  # max over ranks: all skip together
        self.bn_guard.restore_if(bad)  # after backward: BN saved its statistics for it
        self.optim.step(found_inf=bad if overflow is None
                        else torch.clamp_max(bad + overflow, 1.0))
        if self.scaler is not None:
            self.scaler.update(overflow)
        out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
        out["nonfinite"] = bad
        return out

    def _grads_nonfinite(self) -> torch.Tensor:
        """1.0 if any gradient holds a NaN or an inf (one fused pass over the gradients)."""
        found = torch.zeros((), dtype=torch.float32, device=self.device)
        grads = [p.grad for net in self.nets for p in net.parameters() if p.grad is not None]
        if grads:
            # Unscaling by exactly 1 leaves the gradients bit-identical.
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
        return found


class RunningStatsGuard:
    """Undo a skipped step's BatchNorm running-statistics update, on the device.

    The forward pass moves ``running_mean`` / ``running_var`` before the loss is known; one
    NaN batch would leave them NaN for good (every later update mixes the NaN back in), and
    evaluation with them. ``save`` copies them into one flat buffer (one kernel per dtype);
    ``restore_if`` puts the copy back where the flag is set (a select, then one foreach copy):
    a few small kernels per step, no host sync, graph-safe. ``num_batches_tracked`` still
    counts the skipped pass; with a set BN momentum (ours) nothing reads it. It holds the
    buffers themselves: build it once the networks are on their device (``load_state_dict``
    copies in place and keeps them).
    """

    def __init__(self, nets: list[nn.Module]):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for net in nets:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    for b in (m.running_mean, m.running_var):
                        if b is not None:
                            groups.setdefault(b.dtype, []).append(b)
        self.groups = [(bufs, torch.empty(sum(b.numel() for b in bufs), dtype=dt,
                                          device=bufs[0].device))
                       for dt, bufs in groups.items()]

    def save(self) -> None:
        for bufs, flat in self.groups:
            torch.cat([b.reshape(-1) for b in bufs], out=flat)

    def restore_if(self, flag: torch.Tensor) -> None:
        skip = flag > 0
        for bufs, flat in self.groups:
            now = torch.cat([b.reshape(-1) for b in bufs])
            torch.where(skip, flat, now, out=now)
            torch._foreach_copy_(bufs, [v.view_as(b) for v, b in
                                        zip(now.split([b.numel() for b in bufs]), bufs)])


class DeviceLossScaler:
    """Dynamic fp16 loss scaling whose unscale, inf check and update stay on the device
    (the ops GradScaler uses), so that a graph can capture them and nothing syncs."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def unscale_(self, nets: list[nn.Module]) -> torch.Tensor:
        found = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        grads = [p.grad for net in nets for p in net.parameters() if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.scale.reciprocal())
        return found

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5,
                                 self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.scale.copy_(d["scale"])
        self.growth_tracker.copy_(d["growth_tracker"])
