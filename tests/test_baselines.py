"""The demo's closing line: this run against the recorded supervised baseline of its setting."""

import json

from cps_fast import baselines, presets


def table(tmp_path, cfg, values, **extra):
    path = tmp_path / "baselines.json"
    entry = {"setting": baselines.setting_of(cfg), "supervised_miou_a": values,
             "source": "benchmarks/results/x.jsonl", **extra}
    path.write_text(json.dumps({"baselines": [entry]}))
    return str(path)


def test_compare_line_reads_the_table(tmp_path):
    cfg = presets.get("synthetic", "cps")
    sup = presets.get("synthetic", "supervised")
    path = table(tmp_path, sup, {"0": 0.50, "1": 0.52, "2": 0.54})
    assert baselines.find(cfg, path) is not None  # the method is not part of the setting
    line = baselines.compare_line(cfg, {"miou_a": 0.60}, path)
    assert "supervised 52.00 ± 2.00 mIoU" in line and "3 seeds" in line
    assert "this run (cps), network a: 60.00 (+8.00; +10.00 against seed 0's 50.00)" in line
    assert "benchmarks/results/x.jsonl" in line
    worse = baselines.compare_line(cfg, {"miou_a": 0.45}, path)
    assert "45.00 (-7.00; -5.00 against seed 0's 50.00)" in worse


def test_another_setting_has_no_baseline(tmp_path):
    path = table(tmp_path, presets.get("synthetic", "supervised"), {"0": 0.5})
    for change in ("data.split=1/4", "train.iters=17", "data.crop_size=96", "optim.lr=0.5"):
        cfg = presets.get("synthetic").apply_overrides([change])
        assert baselines.find(cfg, path) is None, change
        assert baselines.compare_line(cfg, {"miou_a": 0.6}, path).startswith(
            "no recorded supervised baseline for this setting")
    assert "no recorded" in baselines.compare_line(presets.get("synthetic"), {"miou_a": 0.6},
                                                   str(tmp_path / "missing.json"))


def test_the_committed_table_covers_the_default_demo():
    """`python -m cps_fast.train` with no arguments must find its baseline."""
    cfg = presets.get("synthetic", "cps")
    entry = baselines.find(cfg)
    assert entry is not None, "cps_fast/baselines.json has no entry for the default preset"
    assert len(entry["supervised_miou_a"]) >= 3
    assert all(0 < v < 1 for v in entry["supervised_miou_a"].values())
    assert entry["source"].startswith("benchmarks/results/")
