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


def test_titles_fit_inside_the_saved_figure(tmp_path):
    """The overlap plot's title (plus a long run name) used to run off both edges."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cps_fast.plot import fit_title

    for text in ("Overlap of the two networks' predictions (non-background pixels)\n"
                 "synthetic-cps-20261129-203000",
                 "a title\n" + "a-very-long-run-directory-name-" * 8):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        t = fit_title(fig, ax, text)
        fig.tight_layout()
        box = t.get_window_extent(fig.canvas.get_renderer())
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
        assert t.get_fontsize() >= 6
        plt.close(fig)
    # ...and the run's own plots carry the run name in full when it fits.
    recs = [{"kind": "train", "step": s, "loss": 1.0, "overlap_labeled": 0.5,
             "overlap_unlabeled": 0.4, "overlap_all": 0.45} for s in range(1, 4)]
    run = tmp_path / "synthetic-cps-20261129-203000"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert any(p.name == "overlap.png" for p in write_plots(run))
