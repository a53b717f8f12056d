"""The fast path: the whole training step replayed as one CUDA graph.

``GraphStep`` wraps the same ``TrainStep`` the eager path calls. Its first ``warmup`` calls
run eagerly on a side stream (so that lazily created state — gradient buffers, momentum
buffers, cuDNN/cuBLAS workspaces, Triton autotuning — exists before capture); the next call
captures the step into a graph and then replays it, and every later call copies the new
batch into the static input buffers and replays. Capturing records kernels without running
them, so the sequence of updates is exactly the eager one: warm-up steps are real steps on
real batches, and the captured step's first execution is its first replay.

What keeps it graph-safe lives in the step itself: no host synchronisation, the learning
rate and the step counter as device tensors advanced inside the graph, fused SGD reading
them, gradients kept allocated (``zero_grad(set_to_none=False)``), non-finite steps skipped
on the device, CutMix masks from the default CUDA generator (whose Philox offsets graphs
track). Off CUDA, or under DDP, ``make_step`` returns the eager step with a one-line reason.
With ``train.compile`` the step it wraps is a ``CompiledStep`` (compiled.py): the first
warm-up call compiles the networks and losses, and the capture records the compiled
forward and backward with the optimiser around them.

The mechanics of warm-up and capture sit behind a small ``capture`` object
(``CudaGraphCapture`` here); the tests substitute a CPU op-recording one with the same
replay semantics, so that GraphStep's own logic and the step's graph-safety are exercised
on machines without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .compiled import CompiledStep, resolve_mode
from .step import TrainStep


class CudaGraphCapture:
    """Warm-up on a side stream and ``torch.cuda.graph`` capture, PyTorch's recipe."""

    #: capture records kernels without running them: the captured call must be replayed
    runs_during_capture = False

    def __init__(self):
        self._side = torch.cuda.Stream()

    @contextlib.contextmanager
    def warmup(self):
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            yield
        torch.cuda.current_stream().wait_stream(self._side)

    def capture(self, fn: Callable[[], dict]):
        """(graph, fn's outputs); the outputs live in the graph's memory pool and are
        rewritten by every replay."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may call into CUDA meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    def after_failure(self) -> None:
        torch.cuda.synchronize()


class GraphStep:
    def __init__(self, step: TrainStep, warmup: int = 3,
                 on_fallback: Optional[Callable[[str], None]] = None, capture=None):
        if warmup < 1:
            raise ValueError("GraphStep needs at least one eager warm-up step")
        self.step = step
        self.warmup = warmup
        self.calls = 0
        self.graph = None
        self.static_in: dict[str, torch.Tensor] = {}
        self.static_out: Optional[dict] = None
        self.fallback_reason: Optional[str] = None
        self.on_fallback = on_fallback
        self._capture = capture if capture is not None else CudaGraphCapture()

    # Keep the attributes the trainer reads from a step.
    @property
    def amp_dtype(self):
        return self.step.amp_dtype

    @property
    def scaler(self):
        return self.step.scaler

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def losses(self, batch):
        return self.step.losses(batch)

    def _stage(self, batch: dict[str, torch.Tensor]) -> None:
        """Copy the batch into the static buffers (allocated on the first call)."""
        if not self.static_in:
            self.static_in = {k: torch.empty_like(v, device=self.step.device)
                              for k, v in batch.items()}
        if batch.keys() != self.static_in.keys():
            raise ValueError(f"batch keys changed: {sorted(batch)} vs {sorted(self.static_in)}")
        for k, v in batch.items():
            if v.shape != self.static_in[k].shape:
                # A graph replays fixed shapes: the loaders drop ragged batches.
                raise ValueError(f"batch[{k!r}] shape {tuple(v.shape)} differs from the "
                                 f"captured {tuple(self.static_in[k].shape)}")
            dst = self.static_in[k]
            if not (v.device == dst.device and v.data_ptr() == dst.data_ptr()):
                dst.copy_(v, non_blocking=True)  # (else the loader wrote it there already)

    def input_buffers(self) -> Optional[dict[str, torch.Tensor]]:
        """The static input tensors the graph reads (None before the first call): a loader
        that can write into given tensors (DALI's ``next_into``) fills them directly."""
        return self.static_in or None

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict:
        # Batches may come from the host (the trainer hands pinned host tensors over, to be
        # copied once): every path, the eager fallback too, runs on the staged buffers.
        self._stage(batch)
        if self.fallback_reason is not None:
            return self.step(self.static_in)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            with self._capture.warmup():
                return self.step(self.static_in)
        if self.graph is None:
            try:
                self.graph, self.static_out = self._capture.capture(
                    lambda: self.step(self.static_in))
            except Exception as e:  # a sync or an unsupported op inside the step
                self.fallback_reason = f"CUDA graph capture failed ({type(e).__name__}: " \
                                       f"{str(e).splitlines()[0] if str(e) else ''}); eager step"
                if self.on_fallback is not None:
                    self.on_fallback(self.fallback_reason)
                self._capture.after_failure()
                return self.step(self.static_in)
            if self._capture.runs_during_capture:
                return self.static_out
        self.graph.replay()
        return self.static_out


def make_step(step: TrainStep, path: str, device: torch.device, world_size: int,
              warmup: int = 3, say: Callable[[str], None] = print, compile: str = "auto"):
    """The step for ``--path`` and ``train.compile``: on a single CUDA process a GraphStep
    around the compiled (or, with ``compile=off``, the eager) step; elsewhere the eager step
    with a one-line reason -- or, where a compile mode was asked for explicitly on the CPU,
    the compiled step without a graph. Compile failures fall back inside ``CompiledStep``
    (to graph + fused), capture failures inside ``GraphStep`` (to the step it wraps)."""
    if path != "fast":
        return step
    mode = resolve_mode(compile, device, world_size)
    if world_size > 1:
        say("--path fast: CUDA-graph capture and compilation under DDP are not enabled yet; "
            "running the eager step")
        return step
    inner = step if mode is None else CompiledStep(
        step, mode, on_fallback=lambda r: say(f"--path fast: {r}"))
    if device.type != "cuda":
        say(f"--path fast: no CUDA device ({device}); running the "
            + ("eager step" if mode is None else f"compiled step (train.compile={mode}) "
               "without a CUDA graph"))
        return inner
    return GraphStep(inner, warmup=warmup, on_fallback=lambda r: say(f"--path fast: {r}"))


def describe_step(step) -> dict:
    """What a step object actually runs (benchmark records, the trainer's compile report):
    whether a CUDA graph was captured, whether the objective was compiled, and why not."""
    out: dict = {"graph": isinstance(step, GraphStep)}
    if isinstance(step, GraphStep):
        out["graph_captured"] = step.captured
        if step.fallback_reason is not None:
            out["graph_fallback"] = step.fallback_reason
        step = step.step
    if isinstance(step, CompiledStep):
        out.update(step.report())
    else:
        out["compiled"] = False
    return out
