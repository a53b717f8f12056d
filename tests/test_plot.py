import json

import pytest

pytest.importorskip("matplotlib")

from cps_fast.plot import write_plots  # noqa: E402
from cps_fast.errors import CpsFastError  # noqa: E402


def test_plots_are_written_and_non_empty(tmp_path):
    recs = [{"kind": "train", "step": s, "loss": 3.0 / s, "sup_a": 1.0 / s, "sup_b": 1.1 / s,
             "cps": 0.5 / s, "lr": 0.01 * (1 - s / 10), "overlap_labeled": 0.5 + s / 40,
             "overlap_unlabeled": 0.4 + s / 40, "overlap_all": 0.45 + s / 40} for s in range(1, 9)]
    recs += [{"kind": "eval", "step": 8, "miou_a": 0.4, "miou_b": 0.42, "miou": 0.42}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{cut")
    paths = write_plots(tmp_path)
    assert {p.name for p in paths} == {"losses.png", "lr.png", "miou.png", "overlap.png"}
    for p in paths:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(CpsFastError, match="no metrics"):
        write_plots(tmp_path)
