"""Training streams: determinism, worker independence, resume, epochs, DDP shards, errors."""

import os
import sys

import numpy as np
import pytest
import torch

from cps_fast.config import DataConfig
from cps_fast.data.datasets import build_splits
from cps_fast.data.loader import TrainStream, build_train_streams, iterate_val
from cps_fast.errors import ConfigError, DataError

from data_fakes import make_voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc(root, n_train=24, n_val=3, size=(18, 26))
    return root


def dcfg(root, **kw):
    base = dict(dataset="voc", num_classes=21, root=str(root), crop_size=16, split="1/4",
                scales=(0.75, 1.0, 1.5), batch_size=2, unlabeled_batch_size=3, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batch_shapes_and_keys(voc):
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    s = build_train_streams(cfg, sp, seed=0, method="cps")
    assert set(s) == {"labeled", "unlabeled"}
    b = next(s["labeled"])
    assert b["image"].shape == (2, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["label"].shape == (2, 16, 16) and b["label"].dtype == torch.int64
    u = next(s["unlabeled"])
    assert set(u) == {"image"} and u["image"].shape == (3, 3, 16, 16)
    assert set(build_train_streams(cfg, sp, 0, "supervised")) == {"labeled"}
    s3 = build_train_streams(cfg, sp, 0, "cps-cutmix")
    assert set(s3) == {"labeled", "unlabeled", "unlabeled2"}
    assert not torch.equal(next(s3["unlabeled"])["image"], next(s3["unlabeled2"])["image"])


def test_same_seed_same_batches_other_seed_differs(voc):
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    a = take(TrainStream(sp.labeled, sp.info, cfg, 2, 5, "labeled"), 6)
    b = take(TrainStream(sp.labeled, sp.info, cfg, 2, 5, "labeled"), 6)
    c = take(TrainStream(sp.labeled, sp.info, cfg, 2, 6, "labeled"), 6)
    assert same(a, b) and not same(a, c)


def test_batches_do_not_depend_on_workers(voc):
    sp = build_splits(dcfg(voc))
    a = take(TrainStream(sp.unlabeled, sp.info, dcfg(voc, num_workers=0), 4, 1, "unlabeled", False), 5)
    s = TrainStream(sp.unlabeled, sp.info, dcfg(voc, num_workers=2), 4, 1, "unlabeled", False)
    b = take(s, 5)
    s.close()
    assert same(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_batches(voc, workers):
    cfg = dcfg(voc, num_workers=workers)
    sp = build_splits(cfg)
    ref = TrainStream(sp.labeled, sp.info, cfg, 4, 3, "labeled")  # 6 labeled: epochs straddle
    first = take(ref, 4)
    state = ref.state_dict()
    rest = take(ref, 5)
    assert state == {"epoch": 2, "position": 4} and ref.epoch == 6
    resumed = TrainStream(sp.labeled, sp.info, cfg, 4, 3, "labeled")
    take(resumed, 1)  # prefetched batches from the old position must be dropped
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), rest)
    assert resumed.state_dict() == ref.state_dict()
    ref.close(), resumed.close()
    assert len(first) == 4


def test_epochs_cycle_each_a_permutation(voc):
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    s = TrainStream(sp.labeled, sp.info, cfg, 3, 0, "labeled")
    n = len(sp.labeled)
    orders = [s.epoch_indices(e) for e in range(4)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(n))
    assert len({tuple(o.tolist()) for o in orders}) > 1  # reshuffled per epoch
    take(s, 4)  # 12 samples = 2 epochs of 6
    assert s.epoch == 2 and s.state_dict() == {"epoch": 2, "position": 0}


def test_tiny_labeled_set_smaller_than_a_batch(voc):
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    s = TrainStream(sp.labeled[:2], sp.info, cfg, 5, 0, "labeled")
    b = next(s)
    assert b["image"].shape[0] == 5 and s.epoch == 2 and s.state_dict()["position"] == 1


@pytest.mark.parametrize("n,world", [(12, 4), (11, 4), (6, 3), (5, 8)])
def test_rank_shards_disjoint_and_covering(voc, n, world):
    cfg = dcfg(voc)
    sp = build_splits(cfg, strict=True)
    samples = (sp.labeled + sp.unlabeled)[:n]
    for epoch in (0, 3):
        shards = [TrainStream(samples, sp.info, cfg, 1, 9, "u", False, r, world).epoch_indices(epoch)
                  for r in range(world)]
        assert len({len(x) for x in shards}) == 1  # equal shares: ranks stay in step
        allidx = np.concatenate(shards)
        assert set(allidx.tolist()) == set(range(n))  # covering
        assert len(allidx) - len(set(allidx.tolist())) == len(allidx) - n < world  # disjoint but wrap


def test_sample_augmentation_independent_of_rank(voc):
    """Global position g gets the same sample and augmentation on any world size."""
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    single = next(TrainStream(sp.unlabeled, sp.info, cfg, 2, 4, "u", False))["image"]
    r1 = next(TrainStream(sp.unlabeled, sp.info, cfg, 1, 4, "u", False, rank=1, world_size=2))["image"]
    r0 = next(TrainStream(sp.unlabeled, sp.info, cfg, 1, 4, "u", False, rank=0, world_size=2))["image"]
    assert torch.equal(single[1], r1[0]) and torch.equal(single[0], r0[0])


def test_worker_error_is_one_line_dataerror(tmp_path):
    make_voc(tmp_path, n_train=8, n_val=2)
    cfg = dcfg(tmp_path, num_workers=2, split="1/2")
    sp = build_splits(cfg)
    bad = sp.unlabeled[2].image
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 3])
    s = TrainStream(sp.unlabeled, sp.info, cfg, 2, 0, "unlabeled", False)
    with pytest.raises(DataError) as e:
        take(s, 8)
    s.close()
    msg = str(e.value)
    assert bad in msg and "\n" not in msg and "Traceback" not in msg


def test_cps_without_unlabeled_and_dali_missing(voc, monkeypatch):
    cfg = dcfg(voc, split="24")
    sp = build_splits(cfg)
    assert sp.unlabeled == []
    with pytest.raises(DataError, match="no unlabeled images"):
        build_train_streams(cfg, sp, 0, "cps")
    monkeypatch.setitem(sys.modules, "cps_fast.data.dali", None)  # import fails
    with pytest.raises(ConfigError, match="data.loader=dali: NVIDIA DALI is not installed"):
        build_train_streams(dcfg(voc, loader="dali"), sp, 0, "cps")


def test_bad_state_rejected(voc):
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    s = TrainStream(sp.labeled, sp.info, cfg, 2, 0, "labeled")
    with pytest.raises(DataError, match="bad state"):
        s.load_state_dict({"epoch": 0, "position": 99})


def test_iterate_val(voc):
    cfg = dcfg(voc)
    sp = build_splits(cfg)
    out = list(iterate_val(sp.val, sp.info, cfg))
    assert [o[2] for o in out] == [s.id for s in sp.val]
    img, lab, _ = out[0]
    assert img.shape == (1, 3, 18, 26) and img.dtype == torch.float32
    assert lab.shape == (1, 18, 26) and lab.dtype == torch.int64
    assert len(list(iterate_val(sp, cfg=cfg, max_images=2))) == 2
    par = list(iterate_val(sp.val, sp.info, dcfg(voc, num_workers=2)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out, par))


def test_iterate_val_error_names_file(tmp_path):
    base, _, val = make_voc(tmp_path, n_train=4, n_val=2)
    with open(os.path.join(base, "JPEGImages", val[1] + ".jpg"), "wb") as f:
        f.write(b"garbage")
    cfg = dcfg(tmp_path, split="1/2")
    sp = build_splits(cfg)
    with pytest.raises(DataError, match=val[1] + ".jpg"):
        list(iterate_val(sp.val, sp.info, cfg))


def test_dali_streams_do_not_import_the_loader():
    """The order both stream kinds share lives in stream_order.py: dali.py imports it from
    there and never imports loader.py, which imports dali.py (lazily) to dispatch to it."""
    import ast
    import cps_fast.data.dali_host as host

    path = os.path.join(os.path.dirname(host.__file__), "dali.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "stream_order" in imported and "loader" not in imported
    from cps_fast.data import loader, stream_order
    assert loader.epoch_permutation is stream_order.epoch_permutation
    assert loader.StreamPosition is stream_order.StreamPosition
