"""Reliability and the researcher's workflow: signals, non-finite losses, evaluate, predict."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cps_fast.engine.trainer import Trainer, TrainingError
from cps_fast.runlog import read_metrics

TINY = ["--set", "data.crop_size=48", "--set", "data.batch_size=2",
        "--set", "data.unlabeled_batch_size=2", "--set", "data.num_workers=0",
        "--set", "model.aspp_channels=16", "--set", "model.decoder_channels=16",
        "--set", "model.low_level_channels=8", "--set", "data.val_max_images=2",
        "--set", "train.threads=1", "--set", "eval.every=0", "--set", "train.log_every=1"]


def _py(module, *args, **kw):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    r = _py("cps_fast.train", "--data-root", synth_root, "--iters", "4", "--out", str(out),
            "--quiet", *TINY)
    assert r.returncode == 0, r.stderr
    return out


def test_sigterm_saves_and_resume_finishes(synth_root, tmp_path):
    out = tmp_path / "run"
    args = ["--data-root", synth_root, "--iters", "400", "--out", str(out), *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "cps_fast.train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not read_metrics(out):
        time.sleep(0.5)
    assert read_metrics(out), "training never logged a step"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "SIGTERM received: checkpoint saved at step" in err
    stopped = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 0 < stopped < 400
    # Resume and finish quickly: --iters may change on resume (only the schedule's length).
    r = _py("cps_fast.train", "--data-root", synth_root, "--out", str(out), "--resume",
            "--quiet", *TINY, "--iters", str(stopped + 2))
    assert r.returncode == 0, r.stderr
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert final == stopped + 2


def test_repeated_nonfinite_losses_stop_the_run(make_config, tmp_path):
    trainer = Trainer(make_config("cps", **{"train.max_nonfinite": 2}), tmp_path / "r",
                      quiet=True)
    real = trainer.step_fn.losses

    def poisoned(batch):
        out = real(batch)
        out["loss"] = out["loss"] * float("nan")
        return out
    trainer.step_fn.losses = poisoned
    before = [p.detach().clone() for p in trainer.nets[0].parameters()]
    with pytest.raises(TrainingError, match="at step 2: 2 non-finite losses or gradients in a row"):
        trainer.run()
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.nets[0].parameters()))
    rec = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "train"][-1]
    assert rec["nonfinite_steps"] == 2 and rec["last_nonfinite_step"] == 2


def test_evaluate_cli(trained, synth_root):
    r = _py("cps_fast.evaluate", "--checkpoint", str(trained / "checkpoints" / "best.pt"),
            "--network", "ensemble", "--mode", "sliding", "--crop", "48", "--flip",
            "--max-images", "2")
    assert r.returncode == 0, r.stderr
    assert "ensemble (a+b) = mean of the softmax" in r.stdout and "**mIoU**" in r.stdout
    assert r.stdout.count("| background |") == 1
    assert "protocol: sliding 48/32, flip, scale 1, 2 images" in r.stdout


def test_evaluate_cli_names_the_network_of_every_figure(trained, tmp_path):
    """Issue 14 section 4: network a is the headline; b and the ensemble are printed beside
    it, each with its network, and the JSON holds the protocol."""
    import json
    out = tmp_path / "eval.json"
    r = _py("cps_fast.evaluate", "--checkpoint", str(trained / "checkpoints" / "last.pt"),
            "--max-images", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "network a (the headline mIoU):" in r.stdout
    assert "\nnetwork b:" in r.stdout and "\nensemble (a+b) = mean of the softmax" in r.stdout
    assert r.stdout.count("| background |") == 3
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("mIoU ") and "(network a, headline)" in summary
    assert summary.endswith("[whole image, no flip, scale 1, 2 images]")
    res = json.loads(out.read_text())
    assert res["headline"] == "a" and res["miou"] == res["miou_a"] == res["a"]["miou"]
    assert res["protocol"]["mode"] == "whole" and res["protocol"]["images"] == 2
    assert {"miou_b", "miou_ensemble"} <= set(res)
    r = _py("cps_fast.evaluate", "--checkpoint", str(trained / "checkpoints" / "last.pt"),
            "--max-images", "1", "--network", "b")
    assert r.returncode == 0, r.stderr
    assert "network b (the headline mIoU):" in r.stdout and "network a" not in r.stdout


def test_predict_cli_writes_palette_masks(trained, synth_root, tmp_path):
    img_dir = os.path.join(synth_root, "val", "image")
    one = sorted(os.listdir(img_dir))[0]
    r = _py("cps_fast.predict", "--checkpoint", str(trained / "checkpoints" / "last.pt"),
            os.path.join(img_dir, one), "--out", str(tmp_path / "pred"), "--overlay")
    assert r.returncode == 0, r.stderr
    mask = Image.open(tmp_path / "pred" / (os.path.splitext(one)[0] + ".png"))
    src = Image.open(os.path.join(img_dir, one))
    assert mask.mode == "P" and mask.size == src.size
    assert (tmp_path / "pred" / (os.path.splitext(one)[0] + "_overlay.jpg")).is_file()


def test_missing_checkpoint_is_one_line(tmp_path):
    r = _py("cps_fast.evaluate", "--checkpoint", str(tmp_path / "nope.pt"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: checkpoint {tmp_path / 'nope.pt'}: no such file"


def test_a_run_starts_from_another_runs_backbone(trained, make_config, tmp_path):
    """Two-stage workflows (e.g. CPS from a supervised run): model.pretrained takes a
    cps_fast checkpoint, which holds only tensors and plain values (weights_only loads it)."""
    ckpt = trained / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    trainer = Trainer(make_config("cps", **{"model.pretrained": str(ckpt)}), tmp_path / "r",
                      quiet=True)
    src = {k[len("backbone."):]: v for k, v in saved["nets"][0].items()
           if k.startswith("backbone.")}
    assert src
    for net in trainer.nets:
        got = net.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.items() if "num_batches" not in k)
    heads = [{k: v for k, v in n.state_dict().items() if not k.startswith("backbone.")}
             for n in trainer.nets]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # own heads
