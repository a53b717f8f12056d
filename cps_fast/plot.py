"""``python -m cps_fast.plot RUN_DIR``: training curves as PNGs in ``RUN_DIR/plots/``.

- ``losses.png``: total, supervised (a, b) and CPS losses;
- ``lr.png``: the learning rate;
- ``miou.png``: validation mIoU of each network and their ensemble, the headline marked;
- ``overlap.png``: the overlap ratio of the two networks' predictions on labeled, unlabeled
  and all pixels (non-background), the supplementary's Figure 1 for this run.

The trainer writes them at the end of a run; this command redraws them at any time, also
while a run is going.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import run_main
from .errors import CpsFastError
from .runlog import read_metrics


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def fit_title(fig, ax, text: str, size: float = 10.0, min_size: float = 6.0):
    """Set ``text`` as the axes title, shrunk until every line fits inside the figure.

    A title is centred on the axes, so one wider than the figure is cut off at both sides
    of the saved PNG (as the overlap plot's was, with a long run name on the same line).
    Lines still too wide at ``min_size`` are shortened in the middle with an ellipsis."""
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox

    def fits(t):
        box = t.get_window_extent(renderer)
        return box.x0 >= fig_box.x0 and box.x1 <= fig_box.x1

    t = ax.set_title(text, fontsize=size)
    while not fits(t) and size > min_size:
        size = max(min_size, size - 0.5)
        t.set_fontsize(size)
    lines = text.split("\n")
    while not fits(t):
        i = max(range(len(lines)), key=lambda k: len(lines[k]))
        line = lines[i]
        if len(line) <= 8:
            break
        keep = (len(line) - 2) // 2
        lines[i] = line[:keep] + "…" + line[len(line) - keep + 1:]
        t.set_text("\n".join(lines))
    return t


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write the PNGs; returns their paths (none when there is nothing to plot yet)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CpsFastError("plots need matplotlib: pip install matplotlib") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise CpsFastError(f"{run_dir}: no metrics.jsonl records to plot")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    name = run_dir.name
    figures = []

    def figure(fname, title, ylabel, curves, ylim=None):
        drawn = [(lab, xs, ys) for lab, (xs, ys) in curves if xs]
        if not drawn:
            return
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for lab, xs, ys in drawn:
            ax.plot(xs, ys, label=lab, marker="o" if len(xs) < 20 else None, linewidth=1.6)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fit_title(fig, ax, f"{title}\n{name}")
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        figures.append(path)

    figure("losses.png", "Training losses", "loss (mean over the log interval)",
           [("total", _series(train, "loss")), ("supervised, network a", _series(train, "sup_a")),
            ("supervised, network b", _series(train, "sup_b")), ("CPS (unweighted)", _series(train, "cps"))])
    figure("lr.png", "Learning rate (poly)", "learning rate", [("lr", _series(train, "lr"))])
    head = evals[-1].get("headline") if evals else None   # older runs: not recorded

    def miou_label(k):
        label = f"network {k}" if k != "ensemble" else "ensemble (mean softmax)"
        return label + (" — headline" if k == head else "")
    figure("miou.png", "Validation mIoU", "mIoU",
           [(miou_label(k), _series(evals, f"miou_{k}")) for k in ("a", "b", "ensemble")],
           ylim=(0, 1))
    figure("overlap.png", "Overlap of the two networks' predictions (non-background)",
           "overlap ratio", [("labeled", _series(train, "overlap_labeled")),
                             ("unlabeled", _series(train, "overlap_unlabeled")),
                             ("all", _series(train, "overlap_all"))], ylim=(0, 1))
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cps_fast.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    for path in write_plots(args.run_dir):
        print(path)
    return 0


if __name__ == "__main__":
    run_main(main)
