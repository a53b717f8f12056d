"""The paper presets' ImageNet start: refused without a backbone file (one line, before any
data is read), trained from scratch only when told so (and said in the log and config.json),
the synthetic preset unaffected."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cps_fast import presets
from cps_fast.cli import config_from_args
from cps_fast.config import Config, ModelConfig
from cps_fast.engine.trainer import Trainer
from cps_fast.errors import ConfigError
from cps_fast.models import build_model
from cps_fast.models.resnet import build_backbone
from cps_fast.train import build_parser

# The paper's runs (VOC, Cityscapes); the CPU benchmarks (synthetic, synthetic-v1, fashion)
# train from scratch by design.
PAPER_PRESETS = sorted(n for n in presets.PRESETS
                       if presets.get(n).data.dataset in ("voc", "cityscapes"))
CPU_PRESETS = sorted(set(presets.PRESETS) - set(PAPER_PRESETS))


def make_voc_tree(root, n_train=16, n_val=2, size=(20, 28)):
    """The CPS release layout of VOC: train_aug/{image,label}, val/{image,label}."""
    rng = np.random.default_rng(0)
    for side, n in (("train_aug", n_train), ("val", n_val)):
        os.makedirs(os.path.join(root, side, "image"))
        os.makedirs(os.path.join(root, side, "label"))
        for i in range(n):
            name = f"{side}_{i:04d}"
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            lab = rng.integers(0, 21, size, dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(root, side, "image", name + ".jpg"))
            Image.fromarray(lab).save(os.path.join(root, side, "label", name + ".png"))
    return str(root)


def voc_tiny(root, *extra):
    """voc_r50_1-8 shrunk to seconds (tiny backbone, 32 px crops, 2 iterations)."""
    return presets.get("voc_r50_1-8").apply_overrides([
        f"data.root={root}", "model.backbone=tiny", "model.aspp_channels=16",
        "model.decoder_channels=16", "model.low_level_channels=8", "data.crop_size=32",
        "data.batch_size=2", "data.unlabeled_batch_size=2", "data.num_workers=0",
        "data.check=none", "train.iters=2", "train.log_every=1", "train.checkpoint_every=2",
        "eval.every=0", "eval.crop_size=32", "data.val_max_images=2", "train.threads=1",
        *extra])


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_every_paper_preset_refuses_to_start_without_a_backbone(name):
    for method in ("cps", "cps-cutmix", "supervised"):
        cfg = presets.get(name, method)
        assert cfg.model.pretrained == "required"
        with pytest.raises(ConfigError) as err:
            presets.check_backbone_start(cfg)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("model.pretrained: ")
        expected = "resnet101_v1c.pth" if "_r101_" in name else "resnet50_v1c.pth"
        assert name in msg and expected in msg and "--set model.pretrained=none" in msg
        assert "model.backbone=resnet" in msg and "_tv" in msg  # the torchvision way


def test_synthetic_preset_is_unaffected(make_config, tmp_path, capsys):
    assert len(PAPER_PRESETS) >= 16 and "synthetic" in CPU_PRESETS
    for name in CPU_PRESETS:
        cfg = presets.get(name)
        assert cfg.model.pretrained == "none", name
        presets.check_backbone_start(cfg)  # no error
    Trainer(make_config("supervised"), tmp_path / "r")
    out = capsys.readouterr().out
    assert "backbone: from scratch" in out and "published numbers" not in out


def test_cli_refuses_before_reading_any_data():
    """No data root exists: the error is about the backbone, so it came first."""
    r = subprocess.run([sys.executable, "-m", "cps_fast.train", "--preset", "city_r50_1-8",
                        "--data-root", "/nonexistent/cityscapes"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: model.pretrained: preset city_r50_1-8 ")
    assert "resnet50_v1c.pth" in lines[0] and "nonexistent" not in lines[0]


def test_missing_backbone_file_is_refused_before_reading_data(tmp_path):
    cfg = voc_tiny("/nonexistent/voc", f"model.pretrained={tmp_path / 'nope.pth'}")
    with pytest.raises(ConfigError, match=r"^model.pretrained: .*nope.pth: no such file"):
        Trainer(cfg, tmp_path / "r", quiet=True)


def test_explicit_from_scratch_runs_says_so_and_round_trips(tmp_path, capsys):
    root = make_voc_tree(tmp_path / "voc")
    cfg = voc_tiny(root, "model.pretrained=none")
    run = tmp_path / "run"
    Trainer(cfg, run).run()
    out = capsys.readouterr().out
    assert "backbone: from scratch (model.pretrained=none)" in out
    assert "published numbers of this preset assume an ImageNet backbone" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["pretrained"] == "none"
    assert saved["derived"]["backbone_start"] == "from scratch (model.pretrained=none)"
    # config.json (less the derived values) is the run's config, and resumes
    again = Config.from_dict({k: v for k, v in saved.items() if k != "derived"})
    assert again.to_dict() == cfg.to_dict()
    resumed = Trainer(again, run, resume="latest", quiet=True)
    assert resumed.step == 2
    # ... and as a run file it repeats the run: still from scratch, not "required"
    args = build_parser().parse_args(["--config", str(run / "config.json"),
                                      "--out", str(tmp_path / "again")])
    assert config_from_args(args).to_dict() == {**cfg.to_dict(), "out": str(tmp_path / "again")}


def test_a_backbone_file_starts_the_paper_preset_and_is_recorded(tmp_path):
    root = make_voc_tree(tmp_path / "voc")
    torch.manual_seed(0)
    path = tmp_path / "tiny_imagenet.pth"
    torch.save(build_backbone("tiny").state_dict(), path)
    trainer = Trainer(voc_tiny(root, f"model.pretrained={path}"), tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["pretrained"] == str(path)
    assert saved["derived"]["backbone_start"].startswith(f"ImageNet weights from {path}")
    assert trainer.nets[0].pretrained_report is not None


def test_required_is_refused_by_build_model_and_empty_is_not_none():
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_model(ModelConfig(backbone="tiny", pretrained="required"), 3)
    # An empty value (say, an unset shell variable) must not mean "from scratch".
    for bad in ("", "  "):
        with pytest.raises(ConfigError, match="model.pretrained: empty"):
            Config().apply_overrides([f"model.pretrained={bad}"])
    assert Config().apply_overrides(["model.pretrained=None"]).model.pretrained == "none"
