"""Config: the training scale sets (the paper's default, the official code's by name)."""
import json

import pytest

from cps_fast import presets
from cps_fast.config import OFFICIAL_SCALES, PAPER_SCALES, Config, DataConfig
from cps_fast.errors import ConfigError


def test_default_scales_are_the_papers():
    assert PAPER_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert DataConfig().scales == PAPER_SCALES
    for name in presets.PRESETS:
        cfg = presets.get(name)
        if cfg.model.backbone != "tiny":  # the CPU demos have their own, smaller sets
            assert cfg.data.scales == PAPER_SCALES, name


@pytest.mark.parametrize("value", ["official", "OFFICIAL", " official "])
def test_official_scales_one_set_away_stored_resolved(value):
    cfg = presets.get("voc_r50_1-8").apply_overrides([f"data.scales={value}"])
    assert cfg.data.scales == OFFICIAL_SCALES == (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
    # config.json holds the numbers, not the name, and reads back to the same config
    stored = json.loads(cfg.to_json())
    assert stored["data"]["scales"] == [0.5, 0.75, 1.0, 1.5, 1.75, 2.0]
    assert Config.from_dict(stored).to_dict() == cfg.to_dict()


def test_paper_name_and_explicit_lists():
    cfg = Config().apply_overrides(["data.scales=official", "data.scales=paper"])
    assert cfg.data.scales == PAPER_SCALES
    assert Config().apply_overrides(["data.scales=0.5,1,2"]).data.scales == (0.5, 1.0, 2.0)
    assert Config().apply_overrides(["data.scales=[1.5]"]).data.scales == (1.5,)
    assert DataConfig(scales="official").scales == OFFICIAL_SCALES


@pytest.mark.parametrize("item,needle", [
    ("data.scales=offical", "data.scales: 'offical' is not a list of numbers or one of paper, official"),
    ("data.scales=0.5,-1", "data.scales: needs positive scales"),
    ("data.scales=", "data.scales: needs positive scales"),
    ("eval.scales=official", "eval.scales: 'official' is not a list of numbers"),
])
def test_bad_scales_are_refused_naming_the_key(item, needle):
    with pytest.raises(ConfigError) as err:
        Config().apply_overrides([item])
    assert needle in str(err.value)
