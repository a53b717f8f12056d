"""A short synthetic run learns: validation mIoU well above what chance gets."""

import pytest
import torch

from cps_fast import presets
from cps_fast.engine.trainer import Trainer
from cps_fast.metrics import mean_iou


@pytest.mark.slow
def test_short_synthetic_run_beats_chance(tmp_path_factory):
    from cps_fast.data import synthetic_v2
    root = synthetic_v2.generate(str(tmp_path_factory.mktemp("synth_learn")), n_train=200,
                                 n_val=30, seed=11)
    torch.set_num_threads(2)
    cfg = presets.get("synthetic", "supervised").apply_overrides([
        f"data.root={root}", "data.split=1/1", "train.iters=250", "eval.every=0",
        "data.num_workers=0", "data.check=none", "train.log_every=50"])
    rec = Trainer(cfg, tmp_path_factory.mktemp("learn") / "run", quiet=True).run()
    cm = rec["confusion"]["a"].double()
    # Chance: every pixel predicted as the majority class (background) -- the confusion
    # matrix with all its mass moved into the background column.
    chance = torch.zeros_like(cm)
    chance[:, 0] = cm.sum(1)
    assert mean_iou(chance) < 0.15
    assert rec["miou"] > 1.6 * mean_iou(chance), (rec["miou"], mean_iou(chance))
