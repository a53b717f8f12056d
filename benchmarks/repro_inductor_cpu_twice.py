"""Repro for upstream (plain torch, no cps_fast): CPU Inductor computes a zero input gradient
for a bilinear upsample.

Found through cps_fast's compiled CPS step, where both DeepLabv3+ networks run twice in one
graph (on the labeled and on the unlabeled batch) and every parameter gradient came out
exactly 0 (the loss was right); on the tiny test model one call of the network compiled
correctly and two did not. Cut down, the block below (max-pool -> strided 1x1 conv ->
bilinear upsample back -> concatenate -> 3x3 conv with a trainable weight) goes wrong
with a single call already, so "twice" only changed which fusions the scheduler chose.

What happens (``TORCH_LOGS=output_code``, torch 2.13.0+cpu): the backward of
``upsample_bilinear2d`` is decomposed into four ``_unsafe_index_put(..., accumulate=True)``
into zero-filled buffers, then summed. Here the scheduler fuses the zero fill *and the sum*
into one C++ kernel that runs before the kernel doing the index_put accumulation, so the
sum -- the upsample's input gradient -- is read from the freshly zeroed buffers: 0.
Everything upstream of the upsample (here the input ``x``) gets a zero gradient; the rest is
right. (In the tiny DeepLabv3+ run twice, zero fill, accumulation and sum of the second
call's final upsample share one fused kernel, with the sum's loop placed before the
accumulation's.)

Each piece matters (measured): average-pooling, a strided slice, or a ReLU instead of the
max-pool; no upsample; no concatenation; or a frozen 3x3 weight -- each gives a correct
gradient (a 2x2 max-pool fails as this one does). ``backend="aot_eager"`` (the same
dynamo + AOTAutograd graphs run op by op) and Inductor with ``max_fusion_size=1`` (no
fusion) are correct (~1e-7); Inductor's ``pattern_matcher``, ``epilogue_fusion``,
``loop_ordering_after_fusion``, ``split_reductions``, ``cpp.simdlen=1`` and
``cpp.fallback_scatter_reduce_sum`` options do not help (measured on the full model).
About 30 s on two cores:

    python benchmarks/repro_inductor_cpu_twice.py
"""

import torch
import torch.nn.functional as F


def block(x, w_high, w_fuse):
    low = F.max_pool2d(x, 3, 2, 1)                                     # 16x16 -> 8x8
    high = F.conv2d(low, w_high, stride=4)                             # 8x8 -> 2x2
    up = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=True)
    return F.conv2d(torch.cat([up, up], 1), w_fuse, padding=1)


def once(x1, x2, w_high, w_fuse):
    return block(x1, w_high, w_fuse).square().mean() + 0 * x2.sum()


def twice(x1, x2, w_high, w_fuse):
    return block(x1, w_high, w_fuse).square().mean() + block(x2, w_high, w_fuse).square().mean()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 32, 16, 16, generator=g, requires_grad=True)
    x2 = torch.randn(2, 32, 16, 16, generator=g, requires_grad=True)
    w_high = torch.ones(8, 32, 1, 1) / 32
    w_fuse = (torch.randn(8, 16, 3, 3, generator=g) / 144 ** 0.5).requires_grad_()
    args = (x1, x2, w_high, w_fuse)
    wrt = {"x1": x1, "x2": x2, "w_fuse": w_fuse}
    print(f"torch {torch.__version__}")
    for fn in (once, twice):
        loss = fn(*args)
        want = torch.autograd.grad(loss, list(wrt.values()))
        for backend, opts in [("inductor", None), ("inductor", {"max_fusion_size": 1}),
                              ("aot_eager", None)]:
            torch._dynamo.reset()
            got_loss = torch.compile(fn, backend=backend, fullgraph=True, options=opts)(*args)
            got = torch.autograd.grad(got_loss, list(wrt.values()))
            errs = ", ".join(f"{k} {float((a - b).norm() / b.norm().clamp_min(1e-30)):.2g}"
                             for k, a, b in zip(wrt, got, want))
            print(f"{fn.__name__:5s} {backend:9s} options={opts or {}}: loss rel err "
                  f"{float(((got_loss - loss).abs() / loss.abs()).detach()):.2g}; "
                  f"gradient rel err: {errs}; |grad x1| {float(got[0].norm()):.3g} "
                  f"(eager {float(want[0].norm()):.3g})", flush=True)


if __name__ == "__main__":
    main()
