"""Run files: ``--config FILE``, a YAML or JSON file of the same keys as ``--set``.

Keys may be nested sections or dotted, mixed freely::

    preset: voc_r50_1-8            # the preset the file is applied to (optional)
    data:
      root: /data/VOCdevkit
      split: "183"
    optim.lr: 0.02
    train: {amp: bf16, path: fast}

A run's own ``config.json`` is a valid run file: its ``derived`` section (what the trainer
computed: iterations, lr, split sources) is output only and skipped, and since it holds
every key, ``--config runs/x/config.json`` resolves exactly the config of run x.

Order, later winning: the preset (``--preset``, else the file's ``preset``, else the
default) built for the method (``--method``, else the file's ``train.method``), then the
file, then the command line's options and ``--set``. Unknown keys and bad values fail as
``--set`` does, naming the key and the file. YAML needs PyYAML (the ``yaml`` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from . import presets
from .config import Config
from .errors import ConfigError

OUTPUT_ONLY = ("derived",)   # top-level sections the trainer writes into config.json
METHODS = ("cps", "cps-cutmix", "supervised")


def _load(path: str) -> Any:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"--config {path}: unknown run-file type {ext or '(no extension)'} "
                          "(use .yaml, .yml or .json)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory, not a run file") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise ConfigError(f"--config {path}: cannot read ({why})") from None
    if ext == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"--config {path}: YAML run files need PyYAML "
                          "(pip install pyyaml, or the cps_fast[yaml] extra); "
                          "or write the file as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None


def _flatten(node: dict, prefix: str, path: str, out: dict) -> None:
    for k, v in node.items():
        if not isinstance(k, str):
            raise ConfigError(f"{path}: key {k!r} under {prefix or 'the top level'} is not a "
                              "string")
        key = f"{prefix}.{k}" if prefix else k
        if not prefix and k in OUTPUT_ONLY:
            continue
        if isinstance(v, dict):
            _flatten(v, key, path, out)
        elif key in out:
            raise ConfigError(f"{path}: {key}: given twice (nested and dotted)")
        else:
            out[key] = v


def read_run_file(path: str) -> dict:
    """The values of a run file as ``{dotted key: value}`` (values as YAML/JSON typed them;
    ``derived`` skipped). Raises ConfigError naming the file."""
    data = _load(path)
    if data is None:  # an empty YAML file: nothing to change
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run file holds a mapping of config keys, not a "
                          f"{type(data).__name__}")
    out: dict = {}
    _flatten(data, "", path, out)
    return out


def build_config(preset: Optional[str] = None, method: Optional[str] = None,
                 config_file: Optional[str] = None,
                 default_preset: Optional[str] = "synthetic") -> Config:
    """The base of a command line's config: the preset, with the run file applied on top.

    ``preset``/``method`` are the command line's (None when not given); the file's
    ``preset`` and ``train.method`` stand in for them. With neither a preset nor a file's
    preset, ``default_preset`` (None: the plain ``Config()`` defaults). The caller applies
    its own options and ``--set`` after this, and must re-apply an explicit ``--preset`` /
    ``--method`` (see ``command_line_items``)."""
    values = read_run_file(config_file) if config_file else {}
    name = preset or values.get("preset") or default_preset
    if name is not None and name not in presets.PRESETS:
        where = "--preset" if preset else f"{config_file}: preset"
        raise ConfigError(f"{where}: unknown preset {name!r} "
                          f"(known: {', '.join(sorted(presets.PRESETS))})")
    file_method = values.get("train.method")
    base_method = method or (file_method if file_method in METHODS else
                             presets.default_method(name) if name is not None else "cps")
    cfg = presets.get(name, base_method) if name is not None else Config()
    if values:
        cfg = cfg.apply_values(values, config_file)
    return cfg


def command_line_items(preset: Optional[str], method: Optional[str]) -> list:
    """``--set`` items that make an explicit ``--preset``/``--method`` win over a run file."""
    items = []
    if preset:
        items.append(f"preset={preset}")
    if method:
        items.append(f"train.method={method}")
    return items


__all__ = ["read_run_file", "build_config", "command_line_items", "OUTPUT_ONLY"]
