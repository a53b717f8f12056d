"""Build script: the package (kernels/ importable as cps_fast.kernels) and the compiled
extension cps_fast._C, built from csrc/ by CMake (the pybind11 cmake_example pattern).

Environment knobs:
  CPS_FAST_SKIP_EXT=1        do not build _C at all (the package runs on torch / triton)
  CPS_FAST_CUDA=auto|0|1     CUDA kernels: auto (default) = when nvcc is found; 0 = host part
                             only; 1 = require nvcc (still never fails the install)
  CPS_FAST_CUDA_ARCHS=80;90  target architectures; each gets SASS, the last one also PTX
                             (entries with -real / -virtual are passed to CMake as they are)
  CPS_FAST_BUILD_JOBS=N      parallel compile jobs (default: the CPU count)
  CPS_FAST_HOST_ARCH=auto    -march for the host C++ loops: auto (default) = x86-64-v3 (AVX2,
                             FMA) when the building CPU has it, else the compiler default;
                             none = compiler default; anything else is passed to -march
  CUDACXX / CUDA_HOME        where nvcc is, if it is not on PATH

Whether nvcc exists decides the CUDA part, never whether a GPU is present. A failed build
prints one line and leaves the package installed without _C (cps_fast/ext.py then falls back
to the torch backends with a one-line message). `ptxas -v` resource usage of every kernel is
written to build/ptxas.log (raw) and build/ptxas_summary.txt (one line per kernel).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu")


def _version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else "0"


def source_stamp(root: Path) -> str:
    """sha256 over csrc/ sources and CMakeLists.txt (same algorithm as cps_fast/ext.py)."""
    h = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*")
                   if p.is_file() and p.suffix in _SOURCE_SUFFIXES)
    files.append(root / "CMakeLists.txt")
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _notice(msg: str) -> None:
    # One line on stderr: pip shows it even without -v when the build is interactive.
    print(f"cps_fast: {msg}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    cands = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_archs() -> str:
    raw = os.environ.get("CPS_FAST_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in re.split(r"[;, ]+", raw) if a.strip()]
    out = []
    for i, a in enumerate(archs):
        a = a.replace("sm_", "").replace("compute_", "")
        if "-" in a or i == len(archs) - 1:
            out.append(a)          # the last plain entry: SASS + PTX
        else:
            out.append(a + "-real")
    return ";".join(out)


def _host_march() -> str:
    """The -march of the host code: the build machine is the machine that runs it."""
    want = os.environ.get("CPS_FAST_HOST_ARCH", "auto").strip()
    if want.lower() in ("", "none", "default", "0"):
        return ""
    if want.lower() != "auto":
        return want
    try:
        if sysconfig.get_platform().endswith("x86_64"):
            flags = set()
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
            if {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"} <= flags:
                return "x86-64-v3"
    except OSError:
        pass
    return ""


def summarize_ptxas(log: str) -> tuple[str, int]:
    """One line per (kernel, arch): registers, shared memory, stack and spills; total spill bytes."""
    lines, spills = [], 0
    kernel = arch = None
    props: dict = {}
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            kernel, arch = m.group(1), m.group(2)
            props = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kernel:
            props.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            smem = re.search(r"(\d+) bytes smem", line)
            name = _demangle(kernel)
            st, ld = props.get("spill_st", 0), props.get("spill_ld", 0)
            spills += st + ld
            lines.append(f"{arch:6s} regs={int(m.group(1)):3d} smem={int(smem.group(1)) if smem else 0:6d}B "
                         f"stack={props.get('stack', 0):3d}B spill_st={st}B spill_ld={ld}B  {name}")
            kernel = None
    return "\n".join(sorted(lines)) + "\n", spills


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if not filt:
        return name
    try:
        out = subprocess.run([filt, name], capture_output=True, text=True, timeout=10).stdout.strip()
        return re.sub(r"cps::\(anonymous namespace\)::", "", out) or name
    except Exception:
        return name


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Runs CMake for each CMakeExtension; a failure never fails the install."""

    def build_extensions(self):
        if os.environ.get("CPS_FAST_SKIP_EXT") == "1":
            _notice("CPS_FAST_SKIP_EXT=1: not building the _C extension (torch/triton backends only)")
            self.extensions = []
            return
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext)
            except Exception as e:  # noqa: BLE001 - the package must install without _C
                _notice(f"building {ext.name} failed ({e}); installing without it, the ops fall "
                        f"back to torch. Rebuild: pip install -e . (log: build/cmake-*/build.log)")
        self.extensions = built   # so that the in-place copy and the wheel skip failed ones

    def build_extension(self, ext: CMakeExtension):
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        want = os.environ.get("CPS_FAST_CUDA", "auto").lower()
        nvcc = _find_nvcc() if want not in ("0", "off", "no", "false") else None
        if nvcc is None:
            why = "CPS_FAST_CUDA=0" if want in ("0", "off", "no", "false") else "nvcc not found"
            _notice(f"{why}: building the host (C++) part of {ext.name} only, no CUDA kernels")
        try:
            self._cmake(ext, extdir, nvcc)
        except Exception as e:
            if nvcc is None:
                raise
            _notice(f"the CUDA build of {ext.name} failed ({e}); retrying the host part alone")
            self._cmake(ext, extdir, None)

    def _cmake(self, ext: CMakeExtension, extdir: Path, nvcc: str | None):
        import pybind11  # build requirement

        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}-{'cuda' if nvcc else 'host'}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{_version()}+{source_stamp(ROOT)}"
        args = [
            f"-DCPS_FAST_OUTPUT_DIR={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCPS_FAST_BUILD_STAMP={stamp}",
            "-DCMAKE_BUILD_TYPE=Release",
            # CMake >= 4 refuses packages declaring support for < 3.5 (older pybind11 configs)
            "-DCMAKE_POLICY_VERSION_MINIMUM=3.5",
            f"-DCPS_FAST_HOST_MARCH={_host_march()}",
        ]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as _ninja  # noqa: F401
                ninja = os.path.join(_ninja.BIN_DIR, "ninja")
            except Exception:
                ninja = None
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _drop_stale_cache(build_dir, "Ninja" if ninja else "Unix Makefiles")
        if nvcc:
            archs = _cuda_archs()
            args += ["-DCPS_FAST_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCPS_FAST_CUDA_ARCHS={archs}"]
        else:
            args += ["-DCPS_FAST_CUDA=OFF"]
        jobs = os.environ.get("CPS_FAST_BUILD_JOBS") or str(os.cpu_count() or 1)
        cmake = _cmake_exe()
        log_path = build_dir / "build.log"
        with open(log_path, "w") as log:
            _run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args], log)
            out = _run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], log)
        ptx = "\n".join(l for l in out.splitlines() if "ptxas" in l or "bytes stack frame" in l)
        if nvcc and "ptxas info" in ptx:   # only when device_ops.cu was (re)compiled
            summary, spills = summarize_ptxas(ptx)
            for d in (build_dir, ROOT / "build"):
                (d / "ptxas.log").write_text(ptx + "\n")
                (d / "ptxas_summary.txt").write_text(summary)
            if spills:
                _notice(f"ptxas reports {spills} bytes of register spills (build/ptxas_summary.txt)")
        _notice(f"built {ext.name} ({'host + CUDA ' + _cuda_archs() if nvcc else 'host only'}, "
                f"host -march={_host_march() or 'default'}), stamp {stamp}")


def _cmake_exe() -> str:
    try:
        import cmake  # the PyPI cmake package (build requirement)
        exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.exists(exe):
            return exe
    except Exception:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("cmake not found")
    return exe


def _run(cmd: list[str], log) -> str:
    """Run cmd, echo its output to stdout (pip -v shows it) and the log; raise on failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chunks = []
    assert proc.stdout is not None
    for line in proc.stdout:
        chunks.append(line)
        log.write(line)
        sys.stdout.write(line)
    rc = proc.wait()
    if rc != 0:
        tail = "".join(chunks[-5:]).strip().replace("\n", " | ")[-300:]
        raise RuntimeError(f"`{' '.join(cmd[:2])} ...` exited {rc}: {tail}")
    return "".join(chunks)


def _drop_stale_cache(build_dir: Path, generator: str) -> None:
    """A CMake cache pointing at tools of a deleted (isolated) build env, or made by another
    generator, is unusable: drop it (the next configure starts afresh)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    text = cache.read_text(errors="replace")
    m = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", text, re.M)
    if m and m.group(1) != generator:
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
        return
    for key in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM", "pybind11_DIR", "CMAKE_CUDA_COMPILER"):
        m = re.search(rf"^{key}:\w+=(.*)$", text, re.M)
        if m and m.group(1) and not os.path.exists(m.group(1)):
            cache.unlink()
            shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
            return


setup(
    packages=["cps_fast", "cps_fast.data", "cps_fast.models", "cps_fast.engine", "cps_fast.kernels"],
    package_dir={"cps_fast": "cps_fast", "cps_fast.kernels": "kernels"},
    package_data={"cps_fast": ["baselines.json"]},  # recorded baselines (cps_fast/baselines.py)
    ext_modules=[CMakeExtension("cps_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
