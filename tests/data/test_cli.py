"""``python -m cps_fast.data`` and ``check_dataset``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cps_fast.config import DataConfig
from cps_fast.data.check import check_dataset
from cps_fast.data.cli import main
from cps_fast.data.datasets import build_splits, read_list

from data_fakes import make_cityscapes, make_voc, save_label, write_lines


def voc_args(root):
    return ["--dataset", "voc", "--data-root", str(root)]


def test_splits_writes_official_names_reproducibly(tmp_path, capsys):
    make_voc(tmp_path / "d", n_train=32)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    for out in (out1, out2):
        assert main(["splits", *voc_args(tmp_path / "d"), "--split", "1/16", "1/8", "5",
                     "--split-seed", "3", "--out", str(out)]) == 0
    names = sorted(os.listdir(out1))
    assert names == sorted(f"train_aug_{k}_{t}.txt" for k in ("labeled", "unlabeled")
                           for t in ("1-16", "1-8", "5"))
    for n in names:
        assert (out1 / n).read_bytes() == (out2 / n).read_bytes()
    assert len(read_list(str(out1 / "train_aug_labeled_1-8.txt"))) == 4
    assert len(read_list(str(out1 / "train_aug_unlabeled_1-8.txt"))) == 28
    # The written lists reproduce the run's partition exactly through split_dir.
    gen = build_splits(DataConfig(dataset="voc", num_classes=21, root=str(tmp_path / "d"),
                                  split="1/8", split_seed=3))
    via = build_splits(DataConfig(dataset="voc", num_classes=21, root=str(tmp_path / "d"),
                                  split="1/8", split_dir=str(out1)))
    assert gen.labeled == via.labeled and gen.unlabeled == via.unlabeled
    assert "4 labeled, 28 unlabeled" in capsys.readouterr().out


def test_check_reports_every_problem(tmp_path, capsys):
    base, train, val = make_voc(tmp_path, n_train=8, n_val=3)
    assert main(["check", *voc_args(tmp_path), "--split", "1/2"]) == 0
    sp = build_splits(DataConfig(dataset="voc", num_classes=21, root=str(tmp_path), split="1/2"))
    # 1. truncated image; 2. label out of range; 3. size mismatch; 4. list naming unknown ids.
    img = sp.unlabeled[0].image
    data = Path(img).read_bytes()
    Path(img).write_bytes(data[: len(data) // 2])
    bad = np.zeros((20, 28), np.uint8)
    bad[3, 3] = 99
    save_label(sp.labeled[0].label, bad)
    save_label(sp.val[1].label, np.zeros((5, 5), np.uint8))
    lst = tmp_path / "lab.txt"
    write_lines(str(lst), [sp.labeled[0].id, "2099_123456"])
    capsys.readouterr()
    rc = main(["check", *voc_args(tmp_path), "--set", f"data.labeled_list={lst}"])
    out = capsys.readouterr().out
    assert rc == 1
    problems = [ln for ln in out.splitlines() if ln.startswith("problem: ")]
    assert len(problems) == 4, out
    assert any("2099_123456" in p and str(lst) in p for p in problems)
    assert any(img in p for p in problems)
    assert any(sp.labeled[0].label in p and "99" in p for p in problems)
    assert any("size mismatch" in p and sp.val[1].label in p for p in problems)
    assert "4 problem(s)" in out.splitlines()[-1]


def test_check_dataset_fast_mode(tmp_path):
    make_voc(tmp_path, n_train=40, n_val=2)
    sp = build_splits(DataConfig(dataset="voc", num_classes=21, root=str(tmp_path), split="1/4"))
    assert check_dataset(sp, "fast") == [] and check_dataset(sp, "full", workers=2) == []
    os.remove(sp.unlabeled[-1].image)
    probs = check_dataset(sp, "fast")
    assert len(probs) == 1 and "unlabeled: 1 files missing" in probs[0]
    assert sp.unlabeled[-1].image in probs[0]


def test_errors_are_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cps_fast.data", "check", "--dataset", "voc",
                        "--data-root", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: data.root:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_data_commands_take_a_run_file(tmp_path, capsys):
    """--config where a preset is taken: the file over the preset, the options over both."""
    make_voc(tmp_path / "d", n_train=16)
    run = tmp_path / "run.json"
    run.write_text('{"preset": "voc_r50_1-8", "data": {"root": "%s", "split_seed": 4}, '
                   '"derived": {"num_labeled": 2}}' % (tmp_path / "d"))
    assert main(["check", "--config", str(run), "--fast"]) == 0
    assert "voc at " in capsys.readouterr().out
    assert main(["splits", "--config", str(run), "--split", "1/4", "--out", str(tmp_path / "o")]) == 0
    lab = read_list(str(tmp_path / "o" / "train_aug_labeled_1-4.txt"))
    seeded = build_splits(DataConfig(dataset="voc", num_classes=21, root=str(tmp_path / "d"),
                                     split="1/4", split_seed=4))
    assert [e.id for e in lab] == [s.id for s in seeded.labeled]
    run.write_text('{"data": {"rooot": "x"}}')
    assert main(["check", "--config", str(run)]) == 2
    assert f"error: {run}: data.rooot: unknown key" in capsys.readouterr().err


def test_preview_writes_pngs(tmp_path, capsys):
    make_voc(tmp_path / "d", n_train=8)
    out = tmp_path / "p"
    assert main(["preview", *voc_args(tmp_path / "d"), "--n", "3", "--out", str(out),
                 "--set", "data.crop_size=32"]) == 0
    files = sorted(os.listdir(out))
    assert files == ["preview_000.png", "preview_001.png", "preview_002.png"]
    with Image.open(out / files[0]) as im:
        assert im.size == (32 * 2 + 4, 32)


def test_prepare_synthetic_and_cityscapes_trainids(tmp_path, capsys):
    root = tmp_path / "syn"
    assert main(["prepare", "--dataset", "synthetic", "--data-root", str(root),
                 "--n-train", "3", "--n-val", "2"]) == 0
    assert len(os.listdir(root / "JPEGImages")) == 5
    expected = make_cityscapes(tmp_path / "city", train_ids=False)
    assert main(["prepare", "--dataset", "cityscapes", "--data-root", str(tmp_path / "city"),
                 "--trainids"]) == 0
    sp = build_splits(DataConfig(dataset="cityscapes", num_classes=19, root=str(tmp_path / "city")))
    assert sp.info.label_lut is None  # every image now has trainIds
    s = sp.labeled[0]
    with Image.open(s.label) as im:
        np.testing.assert_array_equal(np.asarray(im), expected[s.id])
