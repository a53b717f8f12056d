"""cps_fast: fast Cross Pseudo Supervision training (two DeepLabv3+ networks, argmax pseudo-labels)."""

__version__ = "0.1.0"
