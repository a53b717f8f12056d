"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path).

Fresh random inputs every run: each test draws a seed from the OS and puts it in every
assertion message, so a failure is reproducible with that seed.
"""
from __future__ import annotations

import os

import pytest
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def logits(gen, n, c, h, w, dtype, channels_last=False, scale=3.0):
    """(N, C, H, W) logits in ``dtype`` (values representable in it) and their fp64 copy."""
    x = (torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, x.double()


def labels(gen, n, c, h, w, ignore_frac=0.2, ignore_index=255, dtype=torch.int64):
    t = torch.randint(0, c, (n, h, w), generator=gen)
    t[torch.rand(n, h, w, generator=gen) < ignore_frac] = ignore_index
    return t.to(dtype)


def need_triton():
    from cps_fast.kernels import _common
    if not _common.HAVE_TRITON:
        pytest.skip("triton is not installed")
    if not _common.interpreter_on() and not torch.cuda.is_available():
        pytest.skip("no CUDA and TRITON_INTERPRET != 1")


def need_compiled_triton():
    """The gpu tests run the compiled kernels: the interpreter at the real shapes would take
    hours, and tests/conftest.py turns it on unless TRITON_INTERPRET is set."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run the gpu kernel tests with TRITON_INTERPRET=0 (compiled kernels)")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_grad_close(got, ref64, eager, dtype, what, seed):
    """fp32: tiny absolute error. Low precision: no worse than twice the eager PyTorch error
    in the same dtype (DESIGN.md section 4) plus one rounding step of the dtype."""
    err = max_err(got, ref64)
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed {seed})"
    if dtype == torch.float32:
        assert err < 1e-6, f"{what}: fp32 error {err} (seed {seed})"
    else:
        eager_err = max_err(eager, ref64)
        ulp = torch.finfo(dtype).eps * ref64.abs().max().item()
        assert err <= 2 * eager_err + ulp, (
            f"{what}: {dtype} error {err} vs eager {eager_err} (seed {seed})")


def assert_loss_close(got, ref64, dtype, what, seed):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    g = float(got.detach())
    r = float(ref64)
    assert abs(g - r) <= tol * max(1.0, abs(r)), f"{what}: {g} vs {r} (seed {seed})"
