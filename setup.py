"""Build script: the package, with kernels/ importable as cps_fast.kernels.

The compiled extension (csrc/ via CMakeLists.txt) is added by the CMake build below.
"""
from setuptools import setup

setup(
    packages=["cps_fast", "cps_fast.data", "cps_fast.models", "cps_fast.engine", "cps_fast.kernels"],
    package_dir={"cps_fast": "cps_fast", "cps_fast.kernels": "kernels"},
)
