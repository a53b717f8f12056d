"""Shared helpers of the cps_fast._C tests (not a test module)."""
import os

import pytest


def load_ext():
    """cps_fast.ext, or skip (fail when CPS_FAST_REQUIRE_EXT=1, as CI sets) with the reason."""
    try:
        import cps_fast.ext as ext
    except ImportError as e:
        if os.environ.get("CPS_FAST_REQUIRE_EXT") == "1":
            pytest.fail(f"CPS_FAST_REQUIRE_EXT=1 but the extension is unavailable: {e}")
        pytest.skip(f"cps_fast._C extension not built/usable: {e}")
    return ext
