"""On a CUDA machine the extension's GPU tests fail -- they do not skip -- when the extension
or its CUDA part is missing. Checked on the CPU by running test_ext_gpu.py in a child pytest
whose torch claims a GPU (a plugin patches torch.cuda.is_available before collection); the
module fixture stops every test before any CUDA call."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PLUGIN = '''
import os
import torch

torch.cuda.is_available = lambda: True     # the gpu marker no longer skips


def pytest_configure(config):
    if os.environ.get("FAKE_HOST_ONLY") == "1":
        import cps_fast.ext as ext
        ext.HAS_CUDA = False                 # as if built without nvcc
'''


def _run(tmp_path, **env):
    (tmp_path / "fakecuda.py").write_text(PLUGIN)
    e = {k: v for k, v in os.environ.items() if k != "CPS_FAST_SKIP_EXT"}
    e["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + ([e["PYTHONPATH"]]
                                                         if e.get("PYTHONPATH") else []))
    e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fakecuda",
         "-rfEs", str(HERE / "test_ext_gpu.py") + "::test_all_ignored_and_determinism_cuda"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=e)


@pytest.mark.parametrize("case", ["missing", "host_only"])
def test_ext_gpu_tests_fail_without_the_cuda_part(tmp_path, case):
    if case == "missing":
        r = _run(tmp_path, CPS_FAST_DISABLE_EXT="1")
        why = "on a CUDA machine the extension must load"
    else:
        pytest.importorskip("cps_fast.ext", exc_type=ImportError)
        r = _run(tmp_path, FAKE_HOST_ONLY="1")
        why = "built without its CUDA part"
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert why in out, out
    assert " skipped" not in out.splitlines()[-1] and "error" in out.splitlines()[-1], out


def test_skip_ext_on_purpose_still_skips(tmp_path):
    r = _run(tmp_path, CPS_FAST_SKIP_EXT="1")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "left out on purpose" in out, out
