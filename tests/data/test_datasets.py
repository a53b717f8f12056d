"""Dataset layouts, split lists (incl. the official files), partitions and their errors."""

import os

import numpy as np
import pytest

from cps_fast.config import DataConfig
from cps_fast.data.datasets import (build_splits, find_split_files, labeled_count,
                                    make_partition, read_list, write_list)
from cps_fast.data.io import read_label
from cps_fast.errors import ConfigError, DataError

from data_fakes import (CITY_IDS, OFFICIAL_SPLITS, OFFICIAL_SPLITS_ENV, make_cityscapes,
                        make_cityscapes_cps, make_voc, make_voc_cps, write_lines)


def voc_cfg(root, **kw):
    return DataConfig(dataset="voc", num_classes=21, root=str(root), **kw)


def city_cfg(root, **kw):
    return DataConfig(dataset="cityscapes", num_classes=19, root=str(root), **kw)


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("at", ["root", "vocdevkit", "voc2012"])
def test_voc_official_tree(tmp_path, at):
    base, train, val = make_voc(tmp_path)
    root = {"root": tmp_path, "vocdevkit": tmp_path / "VOCdevkit", "voc2012": base}[at]
    sp = build_splits(voc_cfg(root, split="1/4", split_seed=3))
    assert len(sp.labeled) == 4 and len(sp.unlabeled) == 12 and len(sp.val) == 4
    assert {s.id for s in sp.labeled} | {s.id for s in sp.unlabeled} == set(train)
    assert [s.id for s in sp.val] == val
    s = sp.labeled[0]
    assert os.path.isabs(s.image) and s.image.endswith(f"JPEGImages/{s.id}.jpg")
    assert s.label.endswith(f"SegmentationClassAug/{s.id}.png")
    assert sp.info.name == "voc" and sp.info.num_classes == 21 and sp.info.background_index == 0
    assert sp.info.palette.shape == (21, 3) and sp.info.palette.dtype == np.uint8
    assert tuple(sp.info.palette[1]) == (128, 0, 0) and tuple(sp.info.palette[15]) == (192, 128, 128)


def test_voc_falls_back_to_segmentationclass_and_train_txt(tmp_path):
    base, train, val = make_voc(tmp_path, aug=False, palette=True)
    sp = build_splits(voc_cfg(tmp_path, split="8"))
    assert len(sp.labeled) == 8 and len(sp.unlabeled) == 8
    assert "SegmentationClass/" in sp.labeled[0].label
    assert sp.sources["labeled"].startswith("partition 8")


def test_voc_without_train_aug_list_uses_aug_labels_minus_val(tmp_path):
    base, train, val = make_voc(tmp_path, train_list=False)
    sp = build_splits(voc_cfg(tmp_path, split="1/2"))
    assert {s.id for s in sp.labeled + sp.unlabeled} == set(train)


def test_voc_cps_tree_and_bare_id_lists_with_crlf(tmp_path):
    train, val = make_voc_cps(tmp_path)
    lab = tmp_path / "lists" / "train_aug_labeled_1-4.txt"
    unl = tmp_path / "lists" / "train_aug_unlabeled_1-4.txt"
    write_lines(str(lab), [i + "  " for i in train[:4]], "\r\n")
    write_lines(str(unl), [i + "\t" for i in train[4:]] + [""], "\r\n")
    sp = build_splits(voc_cfg(tmp_path, split="1/4", split_dir=str(tmp_path / "lists")))
    assert [s.id for s in sp.labeled] == train[:4]
    assert [s.id for s in sp.unlabeled] == train[4:]
    assert sp.labeled[0].image.endswith("train_aug/image/" + train[0] + ".jpg")
    assert [s.id for s in sp.val] == val


def test_cityscapes_official_labelids_mapped_through_lut(tmp_path):
    expected = make_cityscapes(tmp_path, train_ids=False, label_ids=True)
    sp = build_splits(city_cfg(tmp_path, split="1/4"))
    assert sp.info.label_lut is not None and sp.info.background_index is None
    assert len(sp.labeled) == 2 and len(sp.unlabeled) == 6 and len(sp.val) == 2
    s = sp.val[0]
    assert s.label.endswith("_gtFine_labelIds.png")
    lab = read_label(s.label, sp.info.label_lut, 19, 255)
    np.testing.assert_array_equal(lab, expected[s.id])
    assert sp.info.class_names[0] == "road" and tuple(sp.info.palette[0]) == (128, 64, 128)


def test_cityscapes_official_prefers_trainids(tmp_path):
    expected = make_cityscapes(tmp_path, train_ids=True, label_ids=True)
    sp = build_splits(city_cfg(tmp_path, split="1/2"))
    assert sp.info.label_lut is None
    s = sp.labeled[0]
    assert s.label.endswith("_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(read_label(s.label, None, 19, 255), expected[s.id])


def test_cityscapes_cps_tree_with_official_style_lists(tmp_path):
    make_cityscapes_cps(tmp_path)
    lists = tmp_path / "config_new"
    train_lines = (lists / "train.txt").read_bytes().decode().split("\r\n")
    write_lines(str(lists / "subset_train" / "train_aug_labeled_1-4.txt"), train_lines[:2], "\r\n")
    write_lines(str(lists / "subset_train" / "train_aug_unlabeled_1-4.txt"),
                [ln for ln in train_lines[2:] if ln], "\r\n")
    sp = build_splits(city_cfg(tmp_path, split="1/4", split_dir=str(lists),
                               val_list=str(lists / "val.txt")))
    assert [s.id for s in sp.labeled] == CITY_IDS["train"][:2]
    assert len(sp.unlabeled) == 6 and [s.id for s in sp.val] == CITY_IDS["val"]
    assert sp.labeled[0].label.endswith("segmentation/train/jena_000000_000019_gtFine.png")
    assert sp.info.label_lut is None


def test_cps_cityscapes_lists_resolve_on_the_official_tree(tmp_path):
    """Lines '/images/train/x.png<TAB>/segmentation/...' resolve by id on leftImg8bit/."""
    make_cityscapes(tmp_path)
    ids = CITY_IDS["train"]
    lab = tmp_path / "l.txt"
    write_lines(str(lab), [f"/images/train/{i}.png\t/segmentation/train/{i}_gtFine.png" for i in ids[:3]])
    sp = build_splits(city_cfg(tmp_path, labeled_list=str(lab)))
    assert [s.id for s in sp.labeled] == ids[:3]
    assert sp.labeled[0].image.endswith(f"leftImg8bit/train/jena/{ids[0]}_leftImg8bit.png")
    assert {s.id for s in sp.unlabeled} == set(ids[3:])  # the rest of the train list


def test_path_with_spaces(tmp_path):
    root = tmp_path / "my data" / "voc root"
    make_voc(root)
    lst = tmp_path / "my lists" / "lab el.txt"
    write_lines(str(lst), ["2007_000001", "2007_000002"])
    sp = build_splits(voc_cfg(root, labeled_list=str(lst)))
    assert [s.id for s in sp.labeled] == ["2007_000001", "2007_000002"]
    assert " " in sp.labeled[0].image and os.path.isfile(sp.labeled[0].image)


# ------------------------------------------------------------------ list parsing


def test_read_list_formats(tmp_path):
    """Each format in its own file (tests/data/test_splits.py tests them in depth)."""
    p = tmp_path / "l.txt"
    p.write_bytes(b"\xef\xbb\xbfa_1 \r\n\r\n# comment\r\n  d  \n")
    assert [x.id for x in read_list(str(p))] == ["a_1", "d"]
    p.write_bytes(b"/images/train/b_2.png\t/seg/b_2_gtFine.png\r\n")
    e = read_list(str(p))
    assert e[0].image == "/images/train/b_2.png" and e[0].label == "/seg/b_2_gtFine.png"
    p.write_bytes(b"JPEGImages/c.jpg SegmentationClassAug/c.png\n")
    e = read_list(str(p))
    assert e[0].id == "c" and e[0].label == "SegmentationClassAug/c.png"


def test_empty_split_file(tmp_path):
    make_voc(tmp_path)
    p = tmp_path / "empty.txt"
    p.write_text("\r\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: split list is empty"):
        build_splits(voc_cfg(tmp_path, labeled_list=str(p)))


def test_split_naming_missing_files(tmp_path):
    make_voc(tmp_path)
    p = tmp_path / "lab.txt"
    write_lines(str(p), ["2007_000001", "2009_000001", "2009_000002", "2009_000003",
                         "2009_000004", "2009_000005", "2009_000006"])
    with pytest.raises(DataError) as e:
        build_splits(voc_cfg(tmp_path, labeled_list=str(p)))
    msg = str(e.value)
    assert str(p) in msg and "2009_000001" in msg and "6 in all" in msg and "\n" not in msg
    assert "2009_000006" not in msg  # only the first few are named


def test_missing_root_and_dirs(tmp_path):
    with pytest.raises(DataError, match="data.root: .*nowhere does not exist"):
        build_splits(voc_cfg(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no PASCAL VOC tree"):
        build_splits(voc_cfg(tmp_path))
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataError, match="SegmentationClass.*not found"):
        build_splits(voc_cfg(tmp_path))
    with pytest.raises(DataError, match="data.root: not set"):
        build_splits(DataConfig(dataset="voc", num_classes=21))


def test_cps_tree_missing_label_dir(tmp_path):
    make_voc_cps(tmp_path)
    os.rename(tmp_path / "val" / "label", tmp_path / "val" / "labels_old")
    with pytest.raises(DataError, match=r"val/label: label directory not found"):
        build_splits(voc_cfg(tmp_path))


def test_wrong_num_classes_is_config_error(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(ConfigError, match="data.num_classes"):
        build_splits(DataConfig(dataset="voc", num_classes=19, root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.num_classes"):
        build_splits(DataConfig(dataset="cityscapes", num_classes=21, root=str(tmp_path)))


def test_overlapping_lists_rejected_or_collected(tmp_path):
    make_voc(tmp_path)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    write_lines(str(a), ["2007_000001", "2007_000002"])
    write_lines(str(b), ["2007_000002", "2007_000003", "2099_000000"])
    cfg = voc_cfg(tmp_path, labeled_list=str(a), unlabeled_list=str(b))
    with pytest.raises(DataError):
        build_splits(cfg)
    sp = build_splits(cfg, strict=False)
    assert len(sp.problems) == 2
    assert any("2099_000000" in p for p in sp.problems)
    assert any("also in the labeled list" in p and "2007_000002" in p for p in sp.problems)


def test_labeled_ids_without_labels(tmp_path):
    base, train, _ = make_voc(tmp_path)
    os.remove(os.path.join(base, "SegmentationClassAug", train[0] + ".png"))
    p = tmp_path / "l.txt"
    write_lines(str(p), train[:2])
    with pytest.raises(DataError, match=f"without a label file: {train[0]}"):
        build_splits(voc_cfg(tmp_path, labeled_list=str(p)))


# ------------------------------------------------------------------ partitions


def test_generated_partitions_reproducible_and_disjoint():
    ids = [f"id{i:05d}" for i in range(1000)]
    for split, k in (("1/8", 125), ("1/16", 63), ("1/3", 334), ("183", 183), ("1000", 1000)):
        lab, unl = make_partition(ids, split, seed=7)
        assert len(lab) == k and len(unl) == 1000 - k
        assert not set(lab) & set(unl) and set(lab) | set(unl) == set(ids)
        assert lab == sorted(lab)  # list order kept
        assert make_partition(ids, split, seed=7) == (lab, unl)
    assert make_partition(ids, "1/8", 7)[0] != make_partition(ids, "1/8", 8)[0]


def test_official_counts_from_fraction():
    assert [labeled_count(10582, s) for s in ("1/16", "1/8", "1/4", "1/2")] == [662, 1323, 2646, 5291]
    assert [labeled_count(2975, s) for s in ("1/16", "1/8", "1/4", "1/2")] == [186, 372, 744, 1488]
    with pytest.raises(ConfigError, match="data.split"):
        labeled_count(10, "11")


def test_build_splits_partition_same_seed_same_lists(tmp_path):
    make_voc(tmp_path, n_train=40)
    a = build_splits(voc_cfg(tmp_path, split="1/8", split_seed=1))
    b = build_splits(voc_cfg(tmp_path, split="1/8", split_seed=1))
    assert a.labeled == b.labeled and a.unlabeled == b.unlabeled and len(a.labeled) == 5


def test_write_list_roundtrip(tmp_path):
    make_cityscapes(tmp_path, train_ids=True)
    sp = build_splits(city_cfg(tmp_path, split="1/2"))
    out = tmp_path / "lab.txt"
    write_list(str(out), sp.labeled, sp.sources["root"], paths=True)
    first = out.read_text().splitlines()[0]
    assert first.startswith("/leftImg8bit/train/") and "\t/gtFine/train/" in first
    sp2 = build_splits(city_cfg(tmp_path, labeled_list=str(out)))
    assert sp2.labeled == sp.labeled


# ------------------------------------------------------------------ official split files

needs_official = pytest.mark.skipif(
    not os.path.isdir(OFFICIAL_SPLITS),
    reason=f"${OFFICIAL_SPLITS_ENV} does not name the folder of the published CPS split lists")


@needs_official
@pytest.mark.parametrize("tag,lab,unl", [("1-16", 662, 9920), ("1-8", 1323, 9259),
                                         ("1-4", 2646, 7936), ("1-2", 5291, 5291)])
def test_official_voc_lists(tag, lab, unl):
    d = os.path.join(OFFICIAL_SPLITS, "pascal_voc")
    split = tag.replace("-", "/")
    lp, up = find_split_files(d, split)
    assert os.path.basename(lp) == f"train_aug_labeled_{tag}.txt"
    assert os.path.basename(up) == f"train_aug_unlabeled_{tag}.txt"
    le, ue = read_list(lp), read_list(up)
    assert len(le) == lab and len(ue) == unl
    assert all(len(e.id) == 11 and e.id[4] == "_" for e in le[:50])
    assert not {e.id for e in le} & {e.id for e in ue}


@needs_official
def test_official_pseudoseg_lists_with_crlf():
    p = os.path.join(OFFICIAL_SPLITS, "pascal_voc", "subset_train_aug", "pseudoseg_labeled_1-8.txt")
    with open(p, "rb") as f:
        assert b"\r\n" in f.read()
    ids = [e.id for e in read_list(p)]
    assert len(ids) == 183 and all("\r" not in i and i == i.strip() for i in ids)


@needs_official
@pytest.mark.parametrize("tag,lab,unl", [("1-16", 186, 2789), ("1-8", 372, 2603),
                                         ("1-4", 744, 2231), ("1-2", 1488, 1487)])
def test_official_cityscapes_lists(tag, lab, unl):
    d = os.path.join(OFFICIAL_SPLITS, "city")
    lp, up = find_split_files(d, tag.replace("-", "/"))
    le, ue = read_list(lp), read_list(up)
    assert len(le) == lab and len(ue) == unl
    e = le[0]
    assert e.image.startswith("/images/train/") and e.label.endswith("_gtFine.png")
    assert e.id == os.path.basename(e.image)[:-4]
    assert len({x.id for x in le} | {x.id for x in ue}) == 2975
