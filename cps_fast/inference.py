"""Networks from a checkpoint, for evaluation and prediction."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import Config
from .errors import CheckpointError
from .data.datasets import dataset_info
from .models import build_model


def load_networks(path: str | Path, device: torch.device,
                  overrides: list[str] | None = None) -> tuple[Config, dict[str, torch.nn.Module], dict]:
    """(config, {"a": net, "b": net}, meta) from a training checkpoint, in eval mode on
    ``device``; meta holds the dataset's ``class_names`` and ``palette``.

    ``overrides`` (``KEY=VALUE``) apply to the stored config, e.g. a new ``data.root`` or
    evaluation settings; structural keys that would not fit the weights are refused."""
    state = ckpt_io.load(path)
    stored = Config.from_dict({k: v for k, v in state["config"].items() if k != "derived"})
    cfg = stored.apply_overrides(overrides or [])
    ckpt_io.check_compatible(stored.to_dict(), cfg.to_dict(), path)
    nets = {}
    for name, sd in zip("ab", state["nets"]):
        net = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "pretrained": "none"}),
                          cfg.data.num_classes)
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: network {name} does not fit the model "
                                  f"({str(e).splitlines()[0]})") from None
        nets[name] = net.to(device).eval()
    meta = {"class_names": state.get("class_names"), "palette": state.get("palette")}
    if meta["palette"] is None:  # checkpoints written before the palette was stored
        info = dataset_info(cfg.data.dataset)
        meta.update(class_names=list(info.class_names), palette=info.palette.tolist())
    return cfg, nets, meta
