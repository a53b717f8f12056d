"""A run's config.json is a run file: ``--config runs/a/config.json`` repeats run a."""

import json

from cps_fast.cli import config_from_args
from cps_fast.engine.trainer import Trainer
from cps_fast.train import build_parser


def _start(cfg, run_dir):
    """Build a Trainer (which writes run_dir/config.json) and release what it opened."""
    trainer = Trainer(cfg, run_dir, quiet=True)
    for s in trainer.streams.values():
        s.close()
    if trainer.log is not None:
        trainer.log.close()
    return json.loads((run_dir / "config.json").read_text())


def test_a_run_started_from_another_runs_config_json_resolves_the_identical_config(
        make_config, tmp_path):
    cfg = make_config("cps-cutmix", **{"optim.lr": 0.013, "data.split": "5", "eval.flip": "true"})
    first = _start(cfg, tmp_path / "a")
    assert "derived" in first and first["derived"]["num_labeled"] == 5

    args = build_parser().parse_args(["--config", str(tmp_path / "a" / "config.json"),
                                      "--out", str(tmp_path / "b")])
    again = config_from_args(args)
    assert again.to_dict() == {**cfg.to_dict(), "out": str(tmp_path / "b")}
    second = _start(again, tmp_path / "b")
    # The same run in another directory: config and derived values alike.
    assert {**second, "out": None} == {**first, "out": None}
