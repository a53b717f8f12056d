"""The DALI loader inside the system: training + evaluation, and the preview command."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from cps_fast.data.cli import main as data_main
from cps_fast.engine.trainer import Trainer
from cps_fast.runlog import read_metrics

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.dali


def test_training_and_evaluation_through_dali(make_config, tmp_path):
    cfg = make_config("cps", **{"data.loader": "dali", "train.iters": 2})
    trainer = Trainer(cfg, tmp_path / "r", quiet=True)
    assert type(trainer.streams["labeled"]).__name__ == "DaliTrainStream"
    rec = trainer.run()
    assert 0.0 <= rec["miou"] <= 1.0
    assert rec["confusion"]["a"].sum() > 0
    assert [r["step"] for r in read_metrics(tmp_path / "r") if r["kind"] == "train"] == [2]


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_preview_writes_the_same_samples_with_either_loader(synth_root, tmp_path, loader):
    out = tmp_path / loader
    code = data_main(["preview", "--data-root", synth_root, "--out", str(out), "-n", "2",
                      "--set", "data.crop_size=48", "--set", f"data.loader={loader}"])
    assert code == 0
    files = sorted(os.listdir(out))
    assert files == ["preview_000.png", "preview_001.png"]
    img = Image.open(out / files[0])
    assert img.size == (48 * 2 + 4, 48)  # image | gap | colour label


def test_dali_and_torch_previews_agree(synth_root, tmp_path):
    """Same draws on both loaders: the previews differ only by resampling details."""
    for loader in ("torch", "dali"):
        assert data_main(["preview", "--data-root", synth_root, "--out", str(tmp_path / loader),
                          "-n", "1", "--set", "data.crop_size=48",
                          "--set", f"data.loader={loader}"]) == 0
    a = torch.from_numpy(np.array(Image.open(tmp_path / "torch" / "preview_000.png"))).float()
    b = torch.from_numpy(np.array(Image.open(tmp_path / "dali" / "preview_000.png"))).float()
    assert (a - b).abs().mean() < 8.0
