"""Shared helpers of the engine tests (importable by name, also from spawned workers)."""

from cps_fast import presets


def tiny_config(root, method="cps", **sets):
    """The synthetic preset shrunk to seconds: crop 48, batch 2+2, narrow heads."""
    cfg = presets.get("synthetic", method)
    items = [f"data.root={root}", "data.crop_size=48", "data.batch_size=2",
             "data.unlabeled_batch_size=2", "data.num_workers=0", "data.check=none",
             "model.aspp_channels=16", "model.decoder_channels=16", "model.low_level_channels=8",
             "train.iters=6", "train.log_every=2", "train.checkpoint_every=3", "eval.every=0",
             "data.val_max_images=3", "train.threads=1"]
    items += [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    return cfg.apply_overrides(items)


def freeze_batchnorm(nets):
    """BatchNorm layers that always use their running statistics, even in train mode.

    CPU ranks cannot use SyncBatchNorm, so per-rank batch statistics would make a 2-rank run
    differ from a 1-rank run for reasons that have nothing to do with DDP; with frozen
    statistics the two must agree up to floating-point summation order."""
    from torch import nn
    for net in nets:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
                m.train = (lambda mode=True, m=m: m)
