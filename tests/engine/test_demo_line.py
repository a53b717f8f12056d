"""``python -m cps_fast.train`` ends with how its result compares with the recorded
supervised baseline of its setting (or says that none is recorded)."""

import subprocess
import sys

TINY = ["--set", "data.crop_size=48", "--set", "data.batch_size=2",
        "--set", "data.unlabeled_batch_size=2", "--set", "data.num_workers=0",
        "--set", "model.aspp_channels=16", "--set", "model.decoder_channels=16",
        "--set", "model.low_level_channels=8", "--set", "data.val_max_images=2",
        "--set", "train.threads=1", "--set", "eval.every=0"]


def test_train_prints_the_baseline_comparison(synth_root, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cps_fast.train", "--data-root", synth_root,
                        "--iters", "2", "--out", str(tmp_path / "run"), *TINY],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    # The tiny settings are no recorded setting: the run says so, naming its setting.
    assert last.startswith("no recorded supervised baseline for this setting (synthetic-v2, "
                           "1/8 labels, 2 iterations)"), last
