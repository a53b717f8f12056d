"""Fixtures for the engine tests: a small synthetic dataset and a tiny, fast config."""

import pytest

from cps_fast import presets
from cps_fast.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return str(generate_synthetic(str(root), n_train=48, n_val=6, seed=3))


def tiny_config(root, method="cps", **sets):
    """The synthetic preset shrunk to seconds: crop 48, batch 2+2, narrow heads."""
    cfg = presets.get("synthetic", method)
    items = [f"data.root={root}", "data.crop_size=48", "data.batch_size=2",
             "data.unlabeled_batch_size=2", "data.num_workers=0", "data.check=none",
             "model.aspp_channels=16", "model.decoder_channels=16", "model.low_level_channels=8",
             "train.iters=6", "train.log_every=2", "train.checkpoint_every=3", "eval.every=0",
             "data.val_max_images=3", "train.threads=1"]
    items += [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    return cfg.apply_overrides(items)


@pytest.fixture
def make_config(synth_root):
    return lambda method="cps", **sets: tiny_config(synth_root, method, **sets)
