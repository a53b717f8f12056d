"""The exceptions cps_fast raises for bad input.

Entry points catch ``CpsFastError`` and print its message as one line with a non-zero exit,
so every message must name the file, key or argument at fault.
"""


class CpsFastError(Exception):
    """Base of the user-facing errors."""


class ConfigError(CpsFastError, ValueError):
    """A configuration value or command-line option is wrong; the message names the key."""


class DataError(CpsFastError):
    """A dataset problem (missing or corrupt file, bad label values, bad split list); names the file."""


class CheckpointError(CpsFastError):
    """A checkpoint is missing, corrupt or from an incompatible config; names the file and the mismatch."""
