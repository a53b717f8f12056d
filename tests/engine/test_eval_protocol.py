"""Issue 14 section 4 and issue 17's protocol: the trainer reports network a as the headline
mIoU, logs b and the ensemble beside it, picks best.pt by the headline (eval.select), and
stores the evaluation protocol with every figure."""

import pytest
import torch

from cps_fast.engine import trainer as trainer_mod
from cps_fast.engine.trainer import Trainer
from cps_fast.errors import ConfigError
from cps_fast.metrics import mean_iou
from cps_fast.runlog import read_metrics

NUM_CLASSES = 6   # the synthetic set


def _cm(wrong: int) -> torch.Tensor:
    """A confusion matrix whose first ``wrong`` classes are all predicted as the next class:
    the mIoU falls as ``wrong`` grows."""
    cm = torch.eye(NUM_CLASSES, dtype=torch.int64) * 100
    for k in range(wrong):
        cm[k, k] = 0
        cm[k, k + 1] = 100
    return cm


# Two evaluations (steps 3 and 6): b is far better than a at step 3, a is better at 6.
SCRIPT = [{"a": _cm(3), "b": _cm(0), "ensemble": _cm(2)},
          {"a": _cm(1), "b": _cm(4), "ensemble": _cm(3)}]


@pytest.mark.parametrize("select,best_step", [("a", 6), ("b", 3), ("ensemble", 3),
                                              ("max", 3)])
def test_best_checkpoint_follows_the_headline(make_config, tmp_path, monkeypatch, select,
                                              best_step):
    """Network b better than a at the first evaluation: best.pt must still follow a (the
    official evaluation reports network 1); eval.select picks another figure."""
    m = [mean_iou(s[k]) for s in SCRIPT for k in ("a", "b", "ensemble")]
    assert m[0] < m[3] < m[1] and m[4] < m[2] < m[1]          # the script says what it claims
    scripted = iter(SCRIPT)
    seen = {}

    def fake_evaluate(nets, batches, cfg, *args, figures=None, **kw):
        seen["figures"] = figures
        return {k: v.clone() for k, v in next(scripted).items() if k in figures}
    monkeypatch.setattr(trainer_mod, "evaluate", fake_evaluate)
    run = tmp_path / "run"
    cfg = make_config("cps", **{"eval.every": 3, "eval.select": select})
    Trainer(cfg, run, quiet=True).run()
    assert seen["figures"] == ["a", "b", "ensemble"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert best["step"] == best_step
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert all(f"miou_{k}" in r for k in ("a", "b", "ensemble"))
        if select != "max":
            assert r["headline"] == select and r["miou"] == r[f"miou_{select}"]
        else:
            assert r["miou"] == max(r[f"miou_{k}"] for k in ("a", "b", "ensemble"))
    assert best["best_miou"] == max(r["miou"] for r in evals)


def test_eval_record_names_networks_and_protocol(make_config, tmp_path, capsys):
    cfg = make_config("cps", **{"eval.mode": "sliding", "eval.crop_size": "32",
                                "eval.flip": "true", "eval.max_batch": "3"})
    rec = Trainer(cfg, tmp_path / "run", quiet=False).run()
    out = capsys.readouterr().out
    ev = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert ev["headline"] == "a" and ev["miou"] == ev["miou_a"] == rec["miou"]
    assert {"miou_b", "miou_ensemble", "iou_a", "iou_b", "iou_ensemble"} <= set(ev)
    p = ev["protocol"]
    assert p == {"mode": "sliding", "crop": 32, "stride": 22, "stride_rate": round(2 / 3, 6),
                 "flip": True, "scales": [1.0], "figures": ["a", "b", "ensemble"],
                 "select": "a", "ensemble": p["ensemble"], "images": 3}
    assert ev["protocol_str"] == "sliding 32/22, flip, scale 1, 3 images"
    line = next(x for x in out.splitlines() if x.startswith("step 6: "))
    assert "(network a, headline)" in line and "network b" in line and "ensemble (a+b)" in line
    assert line.endswith("[sliding 32/22, flip, scale 1, 3 images]")
    assert "network a (the headline mIoU), sliding 32/22" in out    # the final table's title


def test_supervised_run_reports_its_one_network(make_config, tmp_path):
    rec = Trainer(make_config("supervised"), tmp_path / "r", quiet=True).run()
    assert rec["headline"] == "a" and list(rec["confusion"]) == ["a"]
    assert rec["protocol"]["figures"] == ["a"] and "ensemble" not in rec["protocol"]


@pytest.mark.parametrize("method,sets,needle", [
    ("cps", {"eval.network": "b"}, "eval.select=a: that figure is not evaluated"),
    ("cps", {"eval.network": "both", "eval.select": "ensemble"}, "eval.select=ensemble"),
    ("supervised", {"eval.network": "ensemble"}, "one network"),
])
def test_select_that_is_not_evaluated_fails_at_start(make_config, tmp_path, method, sets,
                                                     needle):
    with pytest.raises(ConfigError, match=needle):
        Trainer(make_config(method, **sets), tmp_path / "r", quiet=True)
