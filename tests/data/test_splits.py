"""Split lists in every common format, where they are found, and VOC's few-label protocol."""

import os

import pytest

from cps_fast import presets
from cps_fast.config import DataConfig
from cps_fast.data.cli import main as data_main
from cps_fast.data.datasets import build_splits
from cps_fast.data.splits import (find_split_files, parse_split_list, read_list, split_aliases,
                                  write_list)
from cps_fast.errors import ConfigError, DataError

from data_fakes import (OFFICIAL_SPLITS, OFFICIAL_SPLITS_ENV, make_cityscapes,
                        make_voc, make_voc_index, write_lines)


def voc_cfg(root, **kw):
    return DataConfig(dataset="voc", num_classes=21, root=str(root), **kw)


def city_cfg(root, **kw):
    return DataConfig(dataset="cityscapes", num_classes=19, root=str(root), **kw)


def write_raw(path, text: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))
    return str(path)


# ------------------------------------------------------------------ parsing each format

# Lines shaped as the published files are (ids: TorchSemiSeg VOC; cps: TorchSemiSeg
# Cityscapes config_new; unimatch: UniMatch splits/pascal and splits/cityscapes), with the
# quirks lists pick up on the way: CRLF, a BOM, trailing blanks and tabs, blank lines,
# comments, no newline at the end.
FIXTURES = {
    "ids": ("\ufeff2007_000032\r\n2007_000039  \r\n\r\n# a comment\r\n\t2007_000063\t\r\n"
            "2011_003255",
            [("2007_000032", None, None), ("2007_000039", None, None),
             ("2007_000063", None, None), ("2011_003255", None, None)]),
    "cps": ("/images/train/jena_000078_000019.png\t/segmentation/train/jena_000078_000019_gtFine.png"
            "  \r\n/images/train/aachen_000000_000019.png\t/segmentation/train/aachen_000000_000019"
            "_gtFine.png\r\n\r\n",
            [("jena_000078_000019", "/images/train/jena_000078_000019.png",
              "/segmentation/train/jena_000078_000019_gtFine.png"),
             ("aachen_000000_000019", "/images/train/aachen_000000_000019.png",
              "/segmentation/train/aachen_000000_000019_gtFine.png")]),
    "unimatch": ("JPEGImages/2008_006748.jpg SegmentationClass/2008_006748.png \r\n"
                 "JPEGImages/2011_000453.jpg  SegmentationClass/2011_000453.png\n",
                 [("2008_006748", "JPEGImages/2008_006748.jpg", "SegmentationClass/2008_006748.png"),
                  ("2011_000453", "JPEGImages/2011_000453.jpg", "SegmentationClass/2011_000453.png")]),
    "unimatch-city": (
        "leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png "
        "gtFine/train/jena/jena_000078_000019_gtFine_labelTrainIds.png\r\n",
        [("jena_000078_000019", "leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png",
          "gtFine/train/jena/jena_000078_000019_gtFine_labelTrainIds.png")]),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_each_format_parsed(tmp_path, name):
    text, expected = FIXTURES[name]
    sl = parse_split_list(write_raw(tmp_path / "l.txt", text))
    assert sl.format == name.split("-")[0]
    assert [(e.id, e.image, e.label) for e in sl.entries] == expected


def test_image_paths_alone_fit_either_path_format(tmp_path):
    only = write_raw(tmp_path / "a.txt", "/images/train/a_1.png\r\nJPEGImages/b.jpg\n")
    sl = parse_split_list(only)
    assert sl.format == "paths" and [e.id for e in sl.entries] == ["a_1", "b"]
    assert all(e.label is None for e in sl.entries)
    mixed = write_raw(tmp_path / "b.txt", "/images/train/a_1.png\n"
                      "/images/train/c_3.png\t/segmentation/train/c_3_gtFine.png\n")
    assert parse_split_list(mixed).format == "cps"


@pytest.mark.parametrize("line,why", [
    ("2007_000032 2007_000033", "space-separated fields"),
    ("JPEGImages/a.jpg SegmentationClass/a.png extra.png", "3 space-separated"),
    ("JPEGImages/a.jpg\tnot-a-path", "TAB-separated fields that are not image paths"),
    ("a.png\tb.png\tc.png", "3 TAB-separated fields"),
    ("JPEGImages/2007_000032", "a path that does not name an image file"),
])
def test_a_line_that_fits_no_format_names_file_and_line(tmp_path, line, why):
    p = write_raw(tmp_path / "bad list.txt", f"2007_000001\r\n\r\n{line}\r\n2007_000002\r\n")
    with pytest.raises(DataError) as e:
        read_list(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: cannot parse ") and why in msg and "\n" not in msg


@pytest.mark.parametrize("lines,bad_line,words", [
    (["2007_000001", "JPEGImages/a.jpg SegmentationClass/a.png"], 2,
     "'image label' paths (UniMatch) in a list of bare ids (line 1)"),
    (["/images/train/a.png\t/segmentation/train/a_gtFine.png", "# c",
      "leftImg8bit/train/a/a_leftImg8bit.png gtFine/train/a/a_gtFine_labelTrainIds.png"], 3,
     "in a list of 'image<TAB>label' paths (CPS) (line 1)"),
    (["2007_000001", "2007_000002", "JPEGImages/a.jpg"], 3,
     "an image path in a list of bare ids (line 1)"),
    (["JPEGImages/a.jpg", "2007_000002"], 2, "a bare id in a list of image paths (line 1)"),
])
def test_mixed_formats_in_one_file_are_an_error(tmp_path, lines, bad_line, words):
    p = tmp_path / "mixed.txt"
    write_lines(str(p), lines, "\r\n")
    with pytest.raises(DataError) as e:
        read_list(str(p))
    assert str(e.value).startswith(f"{p}:{bad_line}: ") and words in str(e.value)


def test_unreadable_lists(tmp_path):
    with pytest.raises(DataError, match="nope.txt: split list not found"):
        read_list(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="is a directory"):
        read_list(str(tmp_path))
    with pytest.raises(DataError, match="not UTF-8"):
        read_list(_write_bytes(tmp_path / "b.txt", b"\xff\xfe\x00a"))
    with pytest.raises(DataError, match="split list is empty"):
        read_list(write_raw(tmp_path / "e.txt", "\r\n  \n# only a comment\n"))


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------ writing and reading back


def test_write_list_formats(tmp_path):
    make_cityscapes(tmp_path, train_ids=True)
    sp = build_splits(city_cfg(tmp_path, split="1/2"))
    root, s = sp.sources["root"], sp.labeled[0]
    for fmt, first in (("ids", s.id),
                       ("cps", f"/leftImg8bit/train/{s.id.split('_')[0]}/{s.id}_leftImg8bit.png\t"
                               f"/gtFine/train/{s.id.split('_')[0]}/{s.id}_gtFine_labelTrainIds.png"),
                       ("unimatch", f"leftImg8bit/train/{s.id.split('_')[0]}/{s.id}_leftImg8bit.png "
                                    f"gtFine/train/{s.id.split('_')[0]}/{s.id}_gtFine_labelTrainIds.png")):
        out = tmp_path / "w" / f"{fmt}.txt"
        write_list(str(out), sp.labeled, root, fmt=fmt)
        assert out.read_text().splitlines()[0] == first
        sl = parse_split_list(str(out))
        assert sl.format == fmt and [e.id for e in sl.entries] == [x.id for x in sp.labeled]
    with pytest.raises(ValueError, match="unknown split list format"):
        write_list(str(tmp_path / "x.txt"), sp.labeled, root, fmt="csv")


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
@pytest.mark.parametrize("fmt", ["cps", "unimatch"])
def test_splits_cli_writes_either_format_and_runs_read_it_back(tmp_path, capsys, dataset, fmt):
    if dataset == "voc":
        make_voc(tmp_path / "d", n_train=32)
        cfg = voc_cfg(tmp_path / "d", split="1/8", split_seed=5)
    else:
        make_cityscapes(tmp_path / "d", train_ids=True)
        cfg = city_cfg(tmp_path / "d", split="1/4", split_seed=5)
    out = tmp_path / "lists"
    assert data_main(["splits", "--dataset", dataset, "--data-root", str(tmp_path / "d"),
                      "--split", cfg.split, "3", "--split-seed", "5", "--format", fmt,
                      "--out", str(out)]) == 0
    if fmt == "unimatch":
        tag = cfg.split.replace("/", "_")
        assert sorted(os.listdir(out)) == sorted([tag, "3", "val.txt"])
        assert sorted(os.listdir(out / tag)) == ["labeled.txt", "unlabeled.txt"]
        assert parse_split_list(str(out / tag / "labeled.txt")).format == "unimatch"
        assert parse_split_list(str(out / "val.txt")).format == "unimatch"
    else:
        assert (out / f"train_aug_labeled_{cfg.split.replace('/', '-')}.txt").is_file()
        want = "ids" if dataset == "voc" else "cps"
        assert parse_split_list(str(out / "train_aug_labeled_3.txt")).format == want
    gen = build_splits(cfg)
    from dataclasses import replace
    for split_dir in ([str(out)] + ([str(out / cfg.split.replace("/", "_"))] if fmt == "unimatch" else [])):
        via = build_splits(replace(cfg, split_dir=split_dir))
        assert via.labeled == gen.labeled and via.unlabeled == gen.unlabeled
    if fmt == "unimatch":
        via_val = build_splits(replace(cfg, val_list=str(out / "val.txt")))
        assert via_val.val == gen.val
    assert f"{len(gen.labeled)} labeled, {len(gen.unlabeled)} unlabeled" in capsys.readouterr().out


def test_unimatch_lists_resolve_on_the_cps_and_official_trees(tmp_path):
    """UniMatch's 'JPEGImages/x.jpg SegmentationClass/x.png' resolve by id on any VOC layout."""
    base, train, _ = make_voc(tmp_path)
    lab = tmp_path / "splits" / "pascal" / "4" / "labeled.txt"
    write_lines(str(lab), [f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in train[:4]], "\r\n")
    write_lines(str(lab.parent / "unlabeled.txt"),
                [f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in train[4:]])
    for split_dir, split in ((lab.parent, "1/8"), (tmp_path / "splits", "4"),
                             (tmp_path / "splits" / "pascal", "4")):
        sp = build_splits(voc_cfg(tmp_path, split=split, split_dir=str(split_dir)))
        assert [s.id for s in sp.labeled] == train[:4] and len(sp.unlabeled) == 12
        assert sp.labeled[0].label.endswith(f"SegmentationClassAug/{train[0]}.png")


# ------------------------------------------------------------------ finding the lists


def test_find_split_files_layouts(tmp_path):
    d = tmp_path / "splits"
    for ds in ("pascal", "cityscapes"):
        for tag in ("1_16", "92"):
            write_lines(str(d / ds / tag / "labeled.txt"), ["a"])
            write_lines(str(d / ds / tag / "unlabeled.txt"), ["b"])
    # A UniMatch tree: the dataset's folder wins; an alias names the same partition.
    lp, up = find_split_files(str(d), "1/16", dataset="cityscapes")
    assert lp == str(d / "cityscapes" / "1_16" / "labeled.txt") and up.endswith("unlabeled.txt")
    lp, _ = find_split_files(str(d), "1/16", "fine", 1464, "voc")
    assert lp == str(d / "pascal" / "1_16" / "labeled.txt")  # the name given first wins
    lp, _ = find_split_files(str(d / "pascal"), "92")
    assert lp == str(d / "pascal" / "92" / "labeled.txt")
    with pytest.raises(DataError, match="several lists for split 1/16"):
        find_split_files(str(d), "1/16")
    # A folder of one partition: labeled.txt inside; the unlabeled list is optional.
    os.remove(d / "pascal" / "92" / "unlabeled.txt")
    assert find_split_files(str(d / "pascal" / "92"), "1/8") == (
        str(d / "pascal" / "92" / "labeled.txt"), None)
    # The CPS naming, with pseudoseg_ lists for the few-label protocol only.
    c = tmp_path / "subset_train_aug"
    for pre in ("train_aug", "pseudoseg"):
        for kind in ("labeled", "unlabeled"):
            write_lines(str(c / f"{pre}_{kind}_1-16.txt"), ["x"])
    assert find_split_files(str(tmp_path), "1/16", pool_size=10582) == (
        str(c / "train_aug_labeled_1-16.txt"), str(c / "train_aug_unlabeled_1-16.txt"))
    assert find_split_files(str(c), "92", "fine", 1464) == (
        str(c / "pseudoseg_labeled_1-16.txt"), str(c / "pseudoseg_unlabeled_1-16.txt"))
    with pytest.raises(DataError) as e:
        find_split_files(str(c), "183", "fine", 1464)
    assert "no labeled list for split 183" in str(e.value) and "pseudoseg_labeled_<183|1-8>" in str(e.value)
    with pytest.raises(DataError, match="is not a directory"):
        find_split_files(str(tmp_path / "nowhere"), "1/8")


def test_split_aliases():
    assert split_aliases("1/16", 1464) == ["1/16", "92"]
    assert split_aliases("92", 1464) == ["92", "1/16"]
    assert split_aliases("1464", 1464) == ["1464"]
    assert split_aliases("1/8", 10582) == ["1/8", "1323"]
    assert split_aliases("1/8") == ["1/8"]


# ------------------------------------------------------------------ the few-label protocol

HQ_COUNTS = (92, 183, 366, 732, 1464)


@pytest.fixture(scope="module")
def voc_fine_tree(tmp_path_factory):
    """A VOC tree (empty files) with the real fine count: 1464 of 2000 train_aug ids."""
    root = tmp_path_factory.mktemp("voc_fine")
    base, train, fine, val = make_voc_index(str(root), n_train=2000, n_fine=1464)
    return root, train, fine


@pytest.mark.parametrize("backbone", ["r50", "r101"])
@pytest.mark.parametrize("count", HQ_COUNTS)
def test_few_label_presets_resolve_the_right_counts(voc_fine_tree, backbone, count):
    root, train, fine = voc_fine_tree
    cfg = presets.get(f"voc_{backbone}_hq{count}").apply_overrides([f"data.root={root}"])
    assert cfg.preset == f"voc_{backbone}_hq{count}" and cfg.data.labeled_pool == "fine"
    assert cfg.model.backbone == {"r50": "resnet50", "r101": "resnet101"}[backbone]
    sp = build_splits(cfg.data)
    lab, unl = [s.id for s in sp.labeled], [s.id for s in sp.unlabeled]
    assert len(lab) == count and set(lab) <= set(fine)
    assert unl == [i for i in train if i not in set(lab)]  # the rest of train_aug, in order
    assert len(unl) == len(train) - count
    # 30 epochs over the larger split (here the unlabeled one but for 1464) at batch 8.
    assert presets.iterations(cfg, len(lab), len(unl)) == 30 * (max(count, len(unl)) // 8)


def test_few_label_partitions_are_seeded_and_fractions_count_the_fine_set(voc_fine_tree):
    root, train, fine = voc_fine_tree
    a = build_splits(voc_cfg(root, split="183", labeled_pool="fine", split_seed=1))
    b = build_splits(voc_cfg(root, split="1/8", labeled_pool="fine", split_seed=1))
    c = build_splits(voc_cfg(root, split="183", labeled_pool="fine", split_seed=2))
    assert a.labeled == b.labeled and a.labeled != c.labeled and len(a.labeled) == 183
    assert a.sources["labeled"].startswith("partition 183 (seed 1) of ") \
        and a.sources["labeled"].endswith("train.txt")
    assert a.sources["labeled_pool"] == "fine"
    whole = build_splits(voc_cfg(root, split="183", split_seed=1))
    assert not {s.id for s in whole.labeled} <= set(fine)  # the train pool is all of train_aug


def test_few_label_with_the_cps_pseudoseg_lists(voc_fine_tree, tmp_path):
    """The CPS release's lists: pseudoseg_labeled_1-16.txt (92 ids, CRLF) beside an
    unlabeled list of the rest of the 1464 that repeats one labeled id; the protocol takes
    the labeled list and the rest of train_aug as the unlabeled split."""
    root, train, fine = voc_fine_tree
    d = tmp_path / "subset_train_aug"
    lab = fine[::16][:92]
    write_lines(str(d / "pseudoseg_labeled_1-16.txt"), lab, "\r\n")
    write_lines(str(d / "pseudoseg_unlabeled_1-16.txt"),
                [i for i in fine if i not in lab] + [lab[0]], "\r\n")
    write_lines(str(d / "train_aug_labeled_1-16.txt"), train[:125], "\r\n")
    write_lines(str(d / "train_aug_unlabeled_1-16.txt"), train[125:], "\r\n")
    for split in ("92", "1/16"):
        cfg = presets.get("voc_r50_hq92").apply_overrides(
            [f"data.root={root}", f"data.split={split}", f"data.split_dir={tmp_path}"])
        sp = build_splits(cfg.data)
        assert [s.id for s in sp.labeled] == lab
        assert {s.id for s in sp.unlabeled} == set(train) - set(lab)
        assert sp.sources["labeled"].endswith("pseudoseg_labeled_1-16.txt")
    # Without the few-label pool, 1/16 is the train_aug partition.
    sp = build_splits(voc_cfg(root, split="1/16", split_dir=str(tmp_path)))
    assert [s.id for s in sp.labeled] == train[:125]


def test_few_label_lists_outside_the_fine_set_are_reported(voc_fine_tree, tmp_path):
    root, train, fine = voc_fine_tree
    outside = [i for i in train if i not in set(fine)][:3]
    p = tmp_path / "labeled.txt"
    write_lines(str(p), fine[:5] + outside)
    cfg = voc_cfg(root, labeled_list=str(p), labeled_pool="fine")
    with pytest.raises(DataError, match="not among the finely annotated images"):
        build_splits(cfg)
    sp = build_splits(cfg, strict=False)
    assert len(sp.problems) == 1 and outside[0] in sp.problems[0]


def test_few_label_pool_needs_voc_and_its_fine_list(tmp_path):
    make_voc(tmp_path / "voc")  # no train.txt
    with pytest.raises(DataError, match="1464 finely annotated images"):
        build_splits(voc_cfg(tmp_path / "voc", labeled_pool="fine"))
    make_cityscapes(tmp_path / "city")
    with pytest.raises(ConfigError, match="data.labeled_pool: fine is VOC's"):
        build_splits(city_cfg(tmp_path / "city", labeled_pool="fine"))
    with pytest.raises(ConfigError, match="data.labeled_pool"):
        DataConfig(labeled_pool="hq")


def test_few_label_on_a_small_real_voc_tree(tmp_path):
    """Real files, the fine list beside train_aug: the seeded partition draws from it."""
    make_voc(tmp_path, n_train=16, n_fine=8)
    sp = build_splits(voc_cfg(tmp_path, split="1/4", labeled_pool="fine"))
    assert len(sp.labeled) == 2 and len(sp.unlabeled) == 14


# ------------------------------------------------------------------ the published lists

needs_official = pytest.mark.skipif(
    not os.path.isdir(OFFICIAL_SPLITS),
    reason=f"${OFFICIAL_SPLITS_ENV} does not name the folder of the published CPS split lists")


@needs_official
@pytest.mark.parametrize("count,tag", [(92, "1-16"), (183, "1-8"), (366, "1-4"), (732, "1-2")])
def test_official_pseudoseg_lists_parse_with_the_right_counts(count, tag):
    d = os.path.join(OFFICIAL_SPLITS, "pascal_voc")
    lp, up = find_split_files(d, str(count), "fine", 1464, "voc")
    assert os.path.basename(lp) == f"pseudoseg_labeled_{tag}.txt"
    lab, unl = parse_split_list(lp), parse_split_list(up)
    assert lab.format == unl.format == "ids"
    assert len(lab.entries) == count and len({e.id for e in lab.entries}) == count
    # The published unlabeled lists: the rest of the 1464 plus one labeled id repeated.
    ids = {e.id for e in lab.entries} | {e.id for e in unl.entries}
    assert len(ids) == 1464 and len(unl.entries) == 1464 - count + 1


@needs_official
def test_official_lists_formats():
    voc = os.path.join(OFFICIAL_SPLITS, "pascal_voc", "subset_train_aug", "train_aug_labeled_1-8.txt")
    city = os.path.join(OFFICIAL_SPLITS, "city", "config_new", "train.txt")
    assert parse_split_list(voc).format == "ids"
    sl = parse_split_list(city)
    assert sl.format == "cps" and len(sl.entries) == 2975
    assert all(e.id.count("_") == 2 and e.label.endswith(f"{e.id}_gtFine.png") for e in sl.entries)
