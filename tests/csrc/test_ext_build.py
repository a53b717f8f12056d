"""The built cps_fast._C: machine code for sm_90, no libtorch / dynamic cudart, no spills,
the build stamp, and the fallback when the extension is missing, stale or disabled."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ext_helpers import load_ext

ROOT = Path(__file__).resolve().parents[2]


def _so_path(ext) -> str:
    return ext._C.__file__


def _cuobjdump():
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if p.exists():
            return str(p)
    except Exception:
        pass
    return shutil.which("cuobjdump")


@pytest.mark.ext
def test_so_contains_sm90_sass_and_ptx():
    ext = load_ext()
    if not ext.HAS_CUDA:
        pytest.skip("the extension was built without nvcc (host part only)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (triton's package or PATH)")
    so = _so_path(ext)
    elf = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, timeout=120)
    assert elf.returncode == 0, elf.stderr
    assert "sm_90" in elf.stdout, elf.stdout
    ptx = subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True, timeout=120)
    assert "sm_90" in ptx.stdout or "compute_90" in ptx.stdout, ptx.stdout


@pytest.mark.ext
def test_so_links_neither_libtorch_nor_dynamic_cudart():
    ext = load_ext()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    out = subprocess.run([readelf, "-d", _so_path(ext)], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert not [n for n in needed if "torch" in n or "c10" in n or "cudart" in n], needed


@pytest.mark.ext
def test_ptxas_reports_no_spills():
    ext = load_ext()
    if not ext.HAS_CUDA:
        pytest.skip("the extension was built without nvcc")
    summary = ROOT / "build" / "ptxas_summary.txt"
    if not summary.exists():
        pytest.skip("no build/ptxas_summary.txt (the extension was not built by setup.py here)")
    lines = [l for l in summary.read_text().splitlines() if l.strip()]
    assert lines, "empty ptxas summary"
    spilling = [l for l in lines if not re.search(r"spill_st=0B spill_ld=0B", l)]
    assert not spilling, "\n".join(spilling)
    assert any(l.startswith("sm_90") for l in lines)


@pytest.mark.ext
def test_build_stamp_matches_sources():
    ext = load_ext()
    assert ext._C.ABI_VERSION == ext.ABI_VERSION
    if (ROOT / "csrc").is_dir():
        assert ext._C.BUILD_STAMP.endswith("+" + ext.source_stamp(ROOT))
        assert ext.stale_reason(ext._C, ROOT) is None


@pytest.mark.ext
def test_stale_sources_are_detected(tmp_path):
    ext = load_ext()
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copy(ROOT / "CMakeLists.txt", tmp_path / "CMakeLists.txt")
    assert ext.stale_reason(ext._C, tmp_path) is None
    with open(tmp_path / "csrc" / "pixel_math.h", "a") as f:
        f.write("\n// edited\n")
    why = ext.stale_reason(ext._C, tmp_path)
    assert why and "stale" in why and "pip install -e ." in why


def _run_py(code: str, **env):
    e = dict(os.environ, **env)
    e.pop("CPS_FAST_REQUIRE_EXT", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=e, cwd=str(ROOT), timeout=300)


_FALLBACK = """
import torch, warnings
warnings.simplefilter("default")
from cps_fast import ops
from cps_fast.errors import ConfigError
x = torch.randn(2, 3, 4, 4); t = torch.randint(0, 3, (2, 4, 4))
assert ops.resolve("cross_entropy", "auto", "cpu") is ops._IMPLS["cross_entropy"]["torch"]
print("loss", float(ops.cross_entropy(x, t)))
try:
    ops.cross_entropy(x, t, backend="cpp")
except ConfigError as e:
    print("cpp-unavailable:", e)
"""


def test_disabled_extension_falls_back_with_one_line_message():
    r = _run_py(_FALLBACK, CPS_FAST_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and "cpp-unavailable" in r.stdout
    msgs = [l for l in r.stderr.splitlines() if "compiled extension is unavailable" in l]
    assert len(msgs) == 1 and "using the torch backend" in msgs[0], r.stderr


def test_missing_extension_falls_back_with_one_line_message():
    code = "import sys; sys.modules['cps_fast._C'] = None\n" + _FALLBACK
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert "cpp-unavailable" in r.stdout
    msgs = [l for l in r.stderr.splitlines() if "compiled extension is unavailable" in l]
    assert len(msgs) == 1 and "not built" in msgs[0] and "pip install -e ." in msgs[0], r.stderr
