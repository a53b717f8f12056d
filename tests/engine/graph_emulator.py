"""A CPU stand-in for CUDA-graph capture, with the same replay semantics.

A CUDA graph records the kernels one call launches, with the addresses of their arguments
and every host-side value (Python scalars, shapes, which branch was taken) frozen; a replay
relaunches the same kernels on the same memory. ``OpRecordingCapture`` does the same one
level up: it records every ATen / custom op the step dispatches (forward, autograd backward
and optimiser alike, through a ``TorchDispatchMode``), keeping the very tensors each call
read and wrote, and a replay calls the same ops on the same tensors, copying each result
into the tensor the recorded call produced. Whatever a real graph would freeze is frozen
here too, so a step that keeps per-step state on the host (a Python learning rate, a host
step counter, a value read back with ``.item()``) replays wrongly on the CPU just as it
would on the GPU.

It also lists the calls that a capture would refuse or silently freeze: reading a tensor
value on the host (``_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``), ops with
data-dependent output shapes, and tensors built from host data inside the step
(``lift_fresh``: ``torch.tensor(...)``, a host-to-device copy on the GPU).

It cannot see what never reaches the dispatcher (a raw kernel launch from Python); every op
of cps_fast is a ``torch.library`` custom op, so nothing of ours is in that class. Code that
TorchInductor generates is in that class (its fused kernels are called directly), so a
compiled step is recorded with the ``aot_eager`` backend: the same dynamo graph and
AOTAutograd forward/backward, run op by op through the dispatcher. Dynamo runs compiled
frames under this mode because it declares ``ignore_compile_internals`` (otherwise dynamo
skips compiled code whenever a dispatch mode is active).
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

# Ops a CUDA graph capture cannot contain or would freeze.
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                 "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                 "aten::equal", "aten::is_nonzero"}
HOST_VALUE_OPS = {"aten::lift_fresh", "aten::lift_fresh_copy"}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list = []
        self.hazards: list[str] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Run (and record) already compiled frames instead of skipping them (torch >= 2.8).
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in HOST_SYNC_OPS or name in HOST_VALUE_OPS:
            where = "".join(traceback.format_stack(limit=8)[:-2])
            self.hazards.append(f"{name}\n{where}")
        out = func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        self.calls.append((func, flat, spec, tree_flatten(out)[0]))
        return out


class RecordedStep:
    """What ``OpRecordingCapture.capture`` returns: ``replay()`` reruns the recorded ops."""

    def __init__(self, calls: list):
        self.calls = calls

    def replay(self) -> None:
        with torch.no_grad():
            for func, flat, spec, outs in self.calls:
                args, kwargs = tree_unflatten(flat, spec)
                new = tree_flatten(func(*args, **kwargs))[0]
                for old, fresh in zip(outs, new):
                    # The graph's fixed addresses: results land in the recorded outputs.
                    if isinstance(old, torch.Tensor) and fresh is not old:
                        old.copy_(fresh)


class OpRecordingCapture:
    """Drop-in for ``CudaGraphCapture`` in ``GraphStep`` (CPU tests)."""

    #: recording executes the call (a CUDA capture does not): no replay right after it
    runs_during_capture = True

    def __init__(self):
        self.hazards: list[str] = []

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, fn):
        rec = _Recorder()
        with rec:
            out = fn()
        self.hazards = rec.hazards
        return RecordedStep(rec.calls), out

    def after_failure(self) -> None:
        pass
