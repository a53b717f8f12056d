"""The training loop: builds everything a run needs, steps, logs, evaluates, checkpoints.

The loop itself never synchronises with the device except where it says so: at a log
interval (metrics copied to the host once), at evaluation and at a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from .. import presets
from ..config import Config
from ..data.datasets import build_splits
from ..data.loader import build_train_streams, iterate_val
from ..errors import CheckpointError, ConfigError, CpsFastError
from ..metrics import format_iou_table, iou_from_confusion, mean_iou, overlap_ratios
from ..models import build_model
from ..runlog import MetricsLog, Progress
from ..distributed import DistInfo, all_reduce_, barrier, convert_sync_bn, wrap_ddp
from .evaluator import (check_select, eval_figures, evaluate, figure_label, format_mious,
                        headline, protocol, protocol_str)
from .graph import GraphStep, describe_step, make_step
from .optim import PolySGD
from .step import TrainStep

_ACC = ("loss", "sup_a", "sup_b", "cps")


class TrainingError(CpsFastError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class _StopFlag:
    """SIGTERM / SIGINT / SIGUSR1 (SLURM's pre-emption warning) ask for a checkpoint at the
    next step boundary; a second signal exits at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some launchers)
                pass

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | os.PathLike, resume: Optional[str] = None,
                 dist_info: Optional[DistInfo] = None, device: Optional[torch.device] = None,
                 quiet: bool = False):
        # A paper preset without its ImageNet backbone (or with a missing file) stops here,
        # in one line, before any data is read or generated.
        presets.check_backbone_start(cfg)
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        rank, world_size = self.dist.rank, self.dist.world_size
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.quiet = quiet
        self.run_dir = Path(run_dir)
        self.device = device if device is not None else resolve_device(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if self.device.type == "cuda":
            # Training crops have one shape: cuDNN's algorithm search pays off at once.
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        seed_everything(cfg.train.seed)

        # ---- data (rank 0 first: it may generate the synthetic set on first use)
        if self.dist.enabled and not self.is_main:
            barrier()
        self.splits = build_splits(cfg.data)
        if self.dist.enabled and self.is_main:
            barrier()
        self.info = self.splits.info
        if cfg.data.check != "none":
            from ..data.check import check_dataset
            problems = check_dataset(self.splits, mode=cfg.data.check)
            if problems:
                shown = "; ".join(problems[:5])
                more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
                raise CpsFastError(f"data check found {len(problems)} problem(s): {shown}{more} "
                                   f"-- run `python -m cps_fast.data check` for the full list")
        self.streams = build_train_streams(cfg.data, self.splits, cfg.train.seed,
                                           cfg.train.method, rank, world_size,
                                           device=self.device)
        self.total_iters = presets.iterations(cfg, len(self.splits.labeled),
                                              len(self.splits.unlabeled), world_size)

        # ---- models: two networks from different seeds (heads initialised independently)
        n_nets = 1 if cfg.train.method == "supervised" else 2
        self.nets = []
        for i in range(n_nets):
            torch.manual_seed(cfg.train.seed * 1000 + i)
            net = build_model(cfg.model, self.info.num_classes)
            net, notice = convert_sync_bn(net, self.dist, self.device, cfg.model.sync_bn)
            if notice and i == 0:
                self._say(notice)
            net = net.to(self.device)
            if cfg.model.channels_last:
                net = net.to(memory_format=torch.channels_last)
            self.nets.append(net)
        report = getattr(self.nets[0], "pretrained_report", None)
        if report is not None:
            self.backbone_start = (f"ImageNet weights from {report.path} "
                                   f"({len(report.loaded)} tensors)")
            self._say(f"pretrained backbone: {report}")
        else:
            self.backbone_start = "from scratch (model.pretrained=none)"
            self._say(f"backbone: {self.backbone_start}" + (
                "" if cfg.data.dataset not in ("voc", "cityscapes") else
                " -- the published numbers of this preset assume an ImageNet backbone"))
        seed_everything(cfg.train.seed)

        # ---- optimisation
        global_batch = cfg.data.batch_size * world_size
        self.base_lr = cfg.optim.lr * (global_batch / cfg.optim.reference_batch
                                       if cfg.optim.lr_scaling == "linear" else 1.0)
        self.optim = PolySGD(self.nets, cfg.optim, self.base_lr, self.total_iters, self.device)
        self.cutmix_gen = None
        graph_path = cfg.train.path == "fast" and self.device.type == "cuda"
        if cfg.train.method == "cps-cutmix" and not graph_path:
            # (On the graph path the masks come from the default CUDA generator, which
            # capture tracks and whose state the checkpoint's RNG states include.)
            self.cutmix_gen = torch.Generator(device=self.device)
            self.cutmix_gen.manual_seed(cfg.train.seed * 1000 + 7 + rank)
        self.step_fn = TrainStep(
            self.nets, self.optim, cfg, self.info.background_index, self.device, self.cutmix_gen,
            wrap=(lambda m: wrap_ddp(m, self.dist, self.device)) if self.dist.enabled else None,
            reduce_flag=(lambda t: all_reduce_(t, "max")) if self.dist.enabled else None)
        self.step_fn = make_step(self.step_fn, cfg.train.path, self.device, world_size,
                                 warmup=cfg.train.graph_warmup, say=self._warn,
                                 compile=cfg.train.compile)
        self._compile_reported = False
        # Which figures evaluation computes and which is the headline: checked now, not
        # at the first evaluation hours later.
        self.eval_figures = eval_figures(cfg.eval.network, n_nets)
        check_select(cfg.eval.select, self.eval_figures, cfg.eval.network)
        self.images_per_step = cfg.data.batch_size + (
            0 if cfg.train.method == "supervised"
            else cfg.data.unlabeled_batch_size * (2 if cfg.train.method == "cps-cutmix" else 1))
        self.amp_dtype = self.step_fn.amp_dtype if self.step_fn.amp_dtype is torch.bfloat16 else None

        # ---- run directory and state
        self.step = 0
        self.best_miou = -1.0
        self.ckpt = ckpt_io.CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_checkpoints)
        if resume == "auto":  # cluster requeue: continue if there is anything to continue
            resume = "latest" if self.ckpt.latest() is not None else None
        if resume is not None:
            self._resume(resume)
        elif self.ckpt.latest() is not None:
            raise ConfigError(f"--out {self.run_dir}: already holds checkpoints; pass --resume "
                              f"to continue that run or choose another --out")
        self.log = None
        if self.is_main:
            self._prepare_run_dir()
            self.log = MetricsLog(self.run_dir)
        self._reset_acc()
        self.stop = _StopFlag()

    # ------------------------------------------------------------------ set-up helpers
    def _say(self, msg: str) -> None:
        if self.is_main and not self.quiet:
            print(msg, flush=True)

    def _warn(self, msg: str) -> None:
        """Printed on rank 0 even when quiet: something did not go as configured."""
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out {self.run_dir}: not writable ({e.strerror})") from None
        resolved = self.cfg.to_dict()
        resolved["derived"] = {"total_iters": self.total_iters, "base_lr": self.base_lr,
                               "backbone_start": self.backbone_start,
                               "world_size": self.world_size,
                               "global_batch": self.cfg.data.batch_size * self.world_size,
                               "device": str(self.device),
                               "num_labeled": len(self.splits.labeled),
                               "num_unlabeled": len(self.splits.unlabeled),
                               "num_val": len(self.splits.val),
                               "splits": self.splits.sources}
        (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))

    def _report_compile(self) -> None:
        """Once, after the first step (which compiles): the compilation time or the
        fallback, as one line, a metrics record and ``derived.compile`` in config.json."""
        self._compile_reported = True
        info = describe_step(self.step_fn)
        if "compile_mode" not in info:
            return  # nothing was compiled or tried
        if info["compiled"]:
            self._say(f"compiled the step (train.compile={info['compile_mode']}, "
                      f"{info['compile_graphs']} graph): {info['compile_s']:.1f} s")
        # (a fallback was already printed, with its reason, when it happened)
        rec = {"kind": "compile", "step": self.step, "time": time.time(),
               **{k: v for k, v in info.items() if k.startswith("compile")}}
        if self.log is not None:
            self.log.write(rec)
        cfg_path = self.run_dir / "config.json"
        if self.is_main and cfg_path.is_file():
            resolved = json.loads(cfg_path.read_text())
            resolved.setdefault("derived", {})["compile"] = {k: v for k, v in rec.items()
                                                            if k not in ("kind", "time")}
            cfg_path.write_text(json.dumps(resolved, indent=2, sort_keys=True))

    def _resume(self, resume: str) -> None:
        path = Path(resume) if resume not in ("", "latest") else self.ckpt.latest()
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint in {self.ckpt.dir}")
        state = ckpt_io.load(path)
        ckpt_io.check_compatible(state["config"], self.cfg.to_dict(), path)
        if len(state["nets"]) != len(self.nets):
            raise CheckpointError(f"checkpoint {path}: holds {len(state['nets'])} networks, "
                                  f"this run has {len(self.nets)}")
        for net, sd in zip(self.nets, state["nets"]):
            net.load_state_dict(sd)
        self.optim.load_state_dict(state["optim"])
        if self.step_fn.scaler is not None and "scaler" in state:
            self.step_fn.scaler.load_state_dict(state["scaler"])
        saved_world = int(state.get("world_size", 1))
        for name, stream in self.streams.items():
            if name in state["streams"]:
                stream.load_state_dict(_rescale_stream_state(
                    state["streams"][name], saved_world, self.world_size, len(stream)))
        same_layout = saved_world == self.world_size
        # The CutMix generator's state is rank 0's; other ranks (or another world size)
        # re-seed theirs from (seed, rank, step) so that ranks still draw different masks.
        ckpt_io.set_rng_state(state["rng"], self.cutmix_gen if same_layout and self.rank == 0
                              else None)
        if self.cutmix_gen is not None and not (same_layout and self.rank == 0):
            self.cutmix_gen.manual_seed(self.cfg.train.seed * 1000 + 7 + self.rank
                                        + 7919 * int(state["step"]))
        self.step = int(state["step"])
        self.best_miou = float(state.get("best_miou", -1.0))
        self._say(f"resumed from {path} at step {self.step}/{self.total_iters}")

    def _state(self) -> dict:
        state = {"config": self.cfg.to_dict(), "nets": [n.state_dict() for n in self.nets],
                 "optim": self.optim.state_dict(),
                 "streams": {k: s.state_dict() for k, s in self.streams.items()},
                 "rng": ckpt_io.rng_state(self.cutmix_gen), "best_miou": self.best_miou,
                 "world_size": self.world_size,
                 "num_classes": self.info.num_classes, "class_names": list(self.info.class_names),
                 "palette": np.asarray(self.info.palette).tolist(),
                 "dataset": self.info.name}
        if self.step_fn.scaler is not None:
            state["scaler"] = self.step_fn.scaler.state_dict()
        return state

    def save(self, is_best: bool = False) -> Optional[Path]:
        if not self.is_main:
            return None
        return self.ckpt.save(self._state(), self.step, is_best=is_best)

    # ------------------------------------------------------------------ metrics
    def _reset_acc(self) -> None:
        self.acc = torch.zeros(len(_ACC), dtype=torch.float64, device=self.device)
        self.acc_stats = torch.zeros(4, dtype=torch.int64, device=self.device)
        self.acc_nonfinite = torch.zeros((), dtype=torch.float32, device=self.device)
        if not hasattr(self, "consec_nonfinite"):
            self.consec_nonfinite = torch.zeros((), dtype=torch.float32, device=self.device)
            self.last_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.acc_steps = 0
        self.acc_t0 = time.perf_counter()

    def _accumulate(self, out: dict) -> None:
        finite = 1.0 - out["nonfinite"]
        vals = torch.stack([out[k].float() for k in _ACC]).to(torch.float64)
        # Non-finite steps are skipped by the optimiser and left out of the averages.
        self.acc += torch.where(finite.bool(), vals, torch.zeros_like(vals))
        self.acc_stats += out["stats"]
        self.acc_nonfinite += out["nonfinite"]
        self.consec_nonfinite.mul_(out["nonfinite"]).add_(out["nonfinite"])
        # The optimiser's device step counter is this step's number (1-based) by now.
        self.last_bad_step.copy_(torch.where(out["nonfinite"] > 0, self.optim.step_t,
                                             self.last_bad_step))
        self.acc_steps += 1

    def _log_train(self, progress: Progress) -> None:
        if self.dist.enabled:  # means over all ranks' batches
            all_reduce_(self.acc)
            self.acc /= self.world_size
            all_reduce_(self.acc_stats)
        # Host sync: one copy of the accumulated device metrics per log interval.
        acc = self.acc.cpu().numpy()
        stats = self.acc_stats.cpu().numpy()
        nonfinite = int(self.acc_nonfinite.item())
        consec = int(self.consec_nonfinite.item())
        last_bad = int(self.last_bad_step.item())
        good = max(self.acc_steps - nonfinite, 1)
        dt = time.perf_counter() - self.acc_t0
        rec = {"kind": "train", "step": self.step, "lr": self._lr_at(self.step - 1),
               **{k: float(acc[i] / good) for i, k in enumerate(_ACC)},
               "images_per_s": self.acc_steps * self.images_per_step * self.world_size / max(dt, 1e-9),
               "nonfinite_steps": nonfinite, "time": time.time()}
        if nonfinite:
            rec["last_nonfinite_step"] = last_bad
        if self.cfg.train.method != "supervised":
            rec.update(overlap_ratios(stats))
        if self.log is not None:
            self.log.write(rec)
        msg = f"loss {rec['loss']:.4f}"
        if "overlap_all" in rec and rec["overlap_all"] == rec["overlap_all"]:
            msg += f" overlap {rec['overlap_all']:.3f}"
        if nonfinite:
            msg += (f" [{nonfinite} non-finite loss/gradient step(s) in this interval, skipped; "
                    f"last at step {last_bad}]")
        progress.update(self.step, self.images_per_step * self.world_size, msg, force=True)
        self._reset_acc()
        if consec >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"training stopped at step {last_bad}: {consec} non-finite "
                                f"losses or gradients in a row (train.max_nonfinite="
                                f"{self.cfg.train.max_nonfinite}); lower optim.lr or check the data")

    def _lr_at(self, step: int) -> float:
        frac = max(0.0, 1.0 - max(step, 0) / max(self.total_iters, 1))
        return self.base_lr * frac ** self.cfg.optim.poly_power

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Evaluate the figures of ``eval.network``; the record's ``miou`` is the headline
        (``eval.select``, network a by default as the official evaluation), ``miou_a`` /
        ``miou_b`` / ``miou_ensemble`` each figure, ``protocol`` how they were measured."""
        cfg = self.cfg
        nets = {k: net for k, net in zip("ab", self.nets)}
        samples = self.splits.val[:cfg.data.val_max_images]
        n_total = len(samples)
        samples = samples[self.rank::self.world_size]  # each rank evaluates its share
        val = iterate_val(samples, self.info, cfg.data, max_images=None, device=self.device)
        bar = Progress(len(samples), desc="eval", enabled=self.is_main and not self.quiet)
        cms = evaluate(nets, val, cfg.eval, self.info.num_classes, cfg.data.ignore_index,
                       self.device, self.amp_dtype, cfg.train.kernels,
                       figures=self.eval_figures, progress=lambda i: bar.update(i))
        bar.close()
        for cm in cms.values():
            all_reduce_(cm)  # the confusion matrices of all ranks' shares
        rec = {"kind": "eval", "step": self.step, "time": time.time()}
        for k, cm in cms.items():  # host sync: one copy per figure, at evaluation only
            rec[f"miou_{k}"] = mean_iou(cm)
            rec[f"iou_{k}"] = [None if v != v else float(v) for v in iou_from_confusion(cm)]
        head = headline({k: rec[f"miou_{k}"] for k in cms}, cfg.eval.select)
        rec["miou"] = rec[f"miou_{head}"]
        rec["headline"] = head
        rec["protocol"] = protocol(cfg.eval, list(cms), n_total)
        rec["protocol_str"] = protocol_str(rec["protocol"])
        if self.log is not None:
            self.log.write(rec)
        self._say(f"step {self.step}: " + format_mious(rec, list(cms)))
        rec["confusion"] = {k: cm.cpu() for k, cm in cms.items()}
        return rec

    # ------------------------------------------------------------------ the loop
    def _next_batch(self) -> dict:
        bufs = getattr(self.step_fn, "input_buffers", lambda: None)()
        if bufs is not None and all(hasattr(s, "next_into") for s in self.streams.values()):
            return self._next_batch_into(bufs)
        lab = self.streams["labeled"].__next__()
        batch = {"image": lab["image"], "label": lab["label"]}
        if "unlabeled" in self.streams:
            batch["unlabeled"] = self.streams["unlabeled"].__next__()["image"]
        if "unlabeled2" in self.streams:
            batch["unlabeled2"] = self.streams["unlabeled2"].__next__()["image"]
        if isinstance(self.step_fn, GraphStep):
            # Host batches go straight into the graph's static buffers (one copy, not two).
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _next_batch_into(self, bufs: dict) -> dict:
        """DALI writes the next batch straight into the graph's static input buffers."""
        self.streams["labeled"].next_into({"image": bufs["image"], "label": bufs["label"]})
        for key in ("unlabeled", "unlabeled2"):
            if key in self.streams:
                self.streams[key].next_into({"image": bufs[key]})
        return bufs

    def run(self, stop_at: Optional[int] = None) -> Optional[dict]:
        """Train to the end (evaluate, checkpoint, return the final evaluation record), or,
        with ``stop_at``, until that step: checkpoint there and return None (resumable)."""
        cfg = self.cfg
        self._say(f"{cfg.preset}: {cfg.train.method} on {self.info.name} "
                  f"({len(self.splits.labeled)} labeled / {len(self.splits.unlabeled)} unlabeled "
                  f"/ {len(self.splits.val)} val), {cfg.model.backbone}, {self.total_iters} "
                  f"iterations, device {self.device}, run dir {self.run_dir}")
        progress = Progress(self.total_iters, start=self.step, desc="train",
                            enabled=self.is_main and not self.quiet)
        self.stop.install()
        last_eval = None
        try:
            while self.step < self.total_iters:
                out = self.step_fn(self._next_batch())
                self.step += 1
                if not self._compile_reported:
                    self._report_compile()
                self._accumulate(out)
                progress.update(self.step, self.images_per_step * self.world_size)
                if self.step % cfg.train.log_every == 0 or self.step == self.total_iters:
                    self._log_train(progress)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_iters:
                    last_eval = self._eval_and_checkpoint()
                elif self.step % cfg.train.checkpoint_every == 0:
                    self.save()
                if self.stop.signum is not None:
                    path = self.save()
                    progress.close()
                    raise Interrupted(self.stop.signum, self.step, path)
                if stop_at is not None and self.step >= stop_at and self.step < self.total_iters:
                    self.save()
                    progress.close()
                    return None
            progress.close()
            last_eval = self._eval_and_checkpoint()
        finally:
            self.stop.restore()
            for s in self.streams.values():
                s.close()
            if self.log is not None:
                self.log.close()
        if self.is_main:
            self._write_plots()
        if self.is_main and not self.quiet:
            head = last_eval["headline"]
            print(f"{figure_label(head)} (the headline mIoU), {last_eval['protocol_str']}:")
            print(format_iou_table(last_eval["confusion"][head], self.info.class_names))
        return last_eval

    def _write_plots(self) -> None:
        from ..plot import write_plots
        try:
            write_plots(self.run_dir)
        except CpsFastError as e:  # matplotlib missing: the run itself is fine
            self._say(f"plots skipped: {e}")

    def _eval_and_checkpoint(self) -> dict:
        rec = self.evaluate()
        # best.pt follows the headline figure (eval.select), not the best of the networks.
        is_best = rec["miou"] > self.best_miou
        if is_best:
            self.best_miou = rec["miou"]
        self.save(is_best=is_best)
        return rec


class Interrupted(CpsFastError):
    """A signal asked the run to stop; a checkpoint was written first."""

    def __init__(self, signum: int, step: int, path: Optional[Path]):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: checkpoint saved at step {step} to {path}; "
                         f"continue with --resume")



def _rescale_stream_state(state: dict, saved_world: int, world: int, shard_len: int) -> dict:
    """A data stream's position saved at one world size, for another: the same number of
    samples consumed in the epoch, shared over the new number of ranks."""
    if saved_world == world:
        return state
    consumed = int(state["position"]) * saved_world
    return {"epoch": int(state["epoch"]), "position": min(consumed // world, shard_len - 1)}
