"""Fixtures for the engine tests: a small synthetic dataset and a tiny, fast config."""

import pytest

from cps_fast.data.synthetic import generate_synthetic
from engine_helpers import tiny_config


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return str(generate_synthetic(str(root), n_train=48, n_val=6, seed=3))


@pytest.fixture
def make_config(synth_root):
    return lambda method="cps", **sets: tiny_config(synth_root, method, **sets)
