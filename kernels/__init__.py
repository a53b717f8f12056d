"""Triton kernels, one op a file, each with its eager reference beside it (importable as cps_fast.kernels)."""
