"""Fixtures for the engine tests: a small synthetic-v2 dataset (the default preset's) and a
tiny, fast config."""

import pytest

from cps_fast.data import synthetic_v2
from engine_helpers import tiny_config


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return str(synthetic_v2.generate(str(root), n_train=48, n_val=6, seed=3))


@pytest.fixture
def make_config(synth_root):
    return lambda method="cps", **sets: tiny_config(synth_root, method, **sets)
