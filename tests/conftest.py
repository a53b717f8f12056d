"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at the top
of the first file pytest loads. Nothing here queries CUDA at import time.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    needs_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    needs_dali = pytest.mark.skip(reason="NVIDIA DALI is not installed")
    have_gpu = have_dali = None
    for item in items:
        if "gpu" in item.keywords:
            if have_gpu is None:
                have_gpu = _cuda_available()
            if not have_gpu:
                item.add_marker(needs_gpu)
        if "dali" in item.keywords:
            if have_dali is None:
                have_dali = _dali_available()
            if not have_dali:
                item.add_marker(needs_dali)
