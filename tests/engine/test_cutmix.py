import numpy as np
import torch

from cps_fast.engine.cutmix import box_masks, mix


def _official(u, h, w, low=0.25, high=0.5, n_boxes=3):
    """The official BoxMaskGenerator's arithmetic (numpy), fed the same uniforms."""
    props = low + (high - low) * u[..., 0]
    y = np.exp(u[..., 1] * np.log(props))
    x = props / y
    fac = np.sqrt(1.0 / n_boxes)
    sizes = np.round(np.stack([y * fac, x * fac], -1) * np.array([h, w]))
    pos = np.round((np.array([h, w]) - sizes) * u[..., 2:4])
    masks = np.zeros((u.shape[0], 1, h, w))
    for i in range(u.shape[0]):
        for (y0, x0), (sy, sx) in zip(pos[i], sizes[i]):
            sl = masks[i, 0, int(y0):int(y0 + sy), int(x0):int(x0 + sx)]
            masks[i, 0, int(y0):int(y0 + sy), int(x0):int(x0 + sx)] = 1 - sl
    return masks


def test_masks_match_the_official_generator():
    g = torch.Generator().manual_seed(5)
    m = box_masks(6, 37, 53, g, torch.device("cpu"))
    u = torch.rand((6, 3, 4), generator=torch.Generator().manual_seed(5)).double().numpy()
    ref = _official(u, 37, 53)
    assert m.shape == (6, 1, 37, 53)
    # Rounding of float32 vs float64 may move a box edge by one pixel at most.
    assert (m.numpy() != ref).mean() < 0.02


def test_masks_binary_deterministic_and_sized():
    a = box_masks(64, 64, 64, torch.Generator().manual_seed(1), torch.device("cpu"))
    b = box_masks(64, 64, 64, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    frac = a.mean((1, 2, 3))
    # Three boxes, each 1/3 of an area proportion in [0.25, 0.5]: coverage in (0, 0.5].
    assert (frac > 0).all() and (frac <= 0.5 + 1e-6).all()


def test_mix_selects_by_mask():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :2] = 1
    out = mix(a, b, m)
    assert (out[:, :, :2] == 1).all() and (out[:, :, 2:] == 0).all()
