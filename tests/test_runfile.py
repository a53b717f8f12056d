"""Run files: ``--config FILE`` (YAML or JSON), nested or dotted keys, precedence, errors."""

import json
import subprocess
import sys

import pytest

from cps_fast import presets
from cps_fast.cli import config_from_args
from cps_fast.config import Config
from cps_fast.errors import ConfigError
from cps_fast.runfile import build_config, read_run_file
from cps_fast.train import build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra")


def resolve(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def write(path, text):
    path.write_text(text)
    return str(path)


NESTED_YAML = """\
preset: voc_r50_1-8
data:
  root: /data/voc
  split: 183          # an int in YAML, a string in the config
  scales: [0.5, 1, 1.5]
optim:
  lr: 0.02
train: {amp: bf16, iters: 100}
out: null
"""

DOTTED_YAML = """\
preset: voc_r50_1-8
data.root: /data/voc
data.split: "183"
data.scales: [0.5, 1.0, 1.5]
optim.lr: 2e-2
train.amp: bf16
train.iters: 100
"""

MIXED_JSON = {"preset": "voc_r50_1-8", "data": {"root": "/data/voc", "split": "183"},
              "data.scales": [0.5, 1, 1.5], "optim.lr": 0.02,
              "train": {"amp": "bf16"}, "train.iters": 100}


def expected():
    return presets.get("voc_r50_1-8").apply_overrides(
        ["data.root=/data/voc", "data.split=183", "data.scales=0.5,1,1.5", "optim.lr=0.02",
         "train.amp=bf16", "train.iters=100"])


@pytest.mark.parametrize("name,text", [("nested.yaml", NESTED_YAML), ("dotted.yml", DOTTED_YAML),
                                       ("mixed.json", json.dumps(MIXED_JSON))])
def test_yaml_and_json_nested_and_dotted_resolve_alike(tmp_path, name, text):
    cfg = resolve("--config", write(tmp_path / name, text))
    assert cfg == expected()
    assert cfg.data.split == "183" and cfg.data.scales == (0.5, 1.0, 1.5)
    assert isinstance(cfg.optim.lr, float) and cfg.train.iters == 100


def test_command_line_wins_over_the_file_and_the_file_over_the_preset(tmp_path):
    f = write(tmp_path / "r.yaml", NESTED_YAML)
    cfg = resolve("--config", f, "--set", "optim.lr=0.05", "--split", "1/4", "--iters", "7",
                  "--data-root", "/elsewhere")
    assert cfg.optim.lr == 0.05 and cfg.data.split == "1/4" and cfg.train.iters == 7
    assert cfg.data.root == "/elsewhere"
    assert cfg.data.crop_size == 512 and cfg.loss.cps_weight == 1.5  # from the preset
    # An explicit --preset picks the base and names the run; the file still applies on top.
    cfg = resolve("--preset", "voc_r101_1-16", "--config", f)
    assert cfg.preset == "voc_r101_1-16" and cfg.model.backbone == "resnet101"
    assert cfg.data.split == "183"
    # Without a preset anywhere, the default preset (synthetic) is the base.
    cfg = resolve("--config", write(tmp_path / "s.yaml", "optim:\n  lr: 0.03\n"))
    assert cfg.preset == "synthetic" and cfg.optim.lr == 0.03
    # An empty file changes nothing.
    # (The default preset trains its default method, CPS + CutMix.)
    assert resolve("--config", write(tmp_path / "e.yaml", "")) == \
        presets.get("synthetic", presets.default_method("synthetic"))


def test_the_method_builds_the_base_and_command_line_method_wins(tmp_path):
    f = write(tmp_path / "m.yaml", "preset: voc_r50_1-8\ntrain.method: cps-cutmix\n")
    cfg = resolve("--config", f)
    assert cfg.train.method == "cps-cutmix" and cfg.loss.cps_weight == 1.0  # CutMix's lambda
    cfg = resolve("--config", f, "--method", "cps")
    assert cfg.train.method == "cps" and cfg.loss.cps_weight == 1.5


def test_a_runs_config_json_repeats_it(tmp_path):
    """config.json as the trainer writes it (with a 'derived' section) resolves exactly."""
    cfg = resolve("--preset", "voc_r101_hq183", "--method", "cps-cutmix", "--data-root", "/v",
                  "--set", "optim.lr=0.005", "--set", "eval.stride_rate=0.6667",
                  "--set", "data.val_max_images=none", "--out", "runs/a")
    d = cfg.to_dict()
    d["derived"] = {"total_iters": 123, "base_lr": 0.005, "splits": {"root": "/v"}}
    f = write(tmp_path / "config.json", json.dumps(d, indent=2, sort_keys=True))
    assert resolve("--config", f) == cfg
    assert resolve("--config", f, "--out", "runs/b").to_dict() == {**cfg.to_dict(), "out": "runs/b"}
    # ... and so does the same file in YAML.
    y = write(tmp_path / "config.yaml", yaml.safe_dump(d))
    assert resolve("--config", y) == cfg


@pytest.mark.parametrize("name,text,match", [
    ("a.yaml", "data:\n  rooot: /x\n", r"a\.yaml: data\.rooot: unknown key 'rooot' \(known: .*root"),
    ("b.json", '{"optim.lr": -1}', r"b\.json: optim\.lr: must be > 0"),
    ("c.yaml", "train:\n  iters: 2.5\n", r"c\.yaml: train\.iters: 2\.5 is not a valid int"),
    ("d.yaml", "train.amp: yes\n", r"d\.yaml: train\.amp: True is not a valid str"),
    ("e.yaml", "data.flip: maybe\n", r"e\.yaml: data\.flip: 'maybe' is not a valid bool"),
    ("f.yaml", "data.scales: [1, a]\n", r"f\.yaml: data\.scales: \[1, 'a'\] is not a valid tuple"),
    ("g.yaml", "model.backbone: resnet18\n", r"g\.yaml: model\.backbone: unknown backbone"),
    ("h.yaml", "optim:\n  lr:\n    base: 1\n", r"h\.yaml: optim\.lr\.base: 'lr' is not a section"),
    ("i.yaml", "nosuch: 1\n", r"i\.yaml: nosuch: unknown key 'nosuch'"),
    ("j.yaml", "data.root: /a\ndata:\n  root: /b\n", r"j\.yaml: data\.root: given twice"),
    ("k.yaml", "- data.root\n", r"k\.yaml: a run file holds a mapping of config keys, not a list"),
    ("l.yaml", "data:\n  root: [\n", r"l\.yaml:\d+: not valid YAML"),
    ("m.json", '{"data": ', r"m\.json:1: not valid JSON"),
    ("n.yaml", "preset: voc_r50_1-3\n", r"n\.yaml: preset: unknown preset 'voc_r50_1-3'"),
    ("o.yaml", "train.method: sup\n", r"o\.yaml: train\.method: unknown method 'sup'"),
    ("p.yaml", "data.num_classes: null\n", r"p\.yaml: data\.num_classes: None is not a valid int"),
    ("q.toml", "x = 1\n", r"--config .*q\.toml: unknown run-file type \.toml"),
])
def test_bad_keys_and_values_name_the_key_and_the_file(tmp_path, name, text, match):
    f = write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=match):
        resolve("--config", f)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: file not found"):
        resolve("--config", str(tmp_path / "nope.yaml"))


def test_yaml_without_pyyaml_is_a_one_line_error_and_json_still_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(ConfigError, match=r"r\.yaml: YAML run files need PyYAML \(pip install pyyaml"):
        read_run_file(write(tmp_path / "r.yaml", "optim.lr: 0.1\n"))
    assert read_run_file(write(tmp_path / "r.json", '{"optim": {"lr": 0.1}}')) == {"optim.lr": 0.1}


def test_build_config_without_a_default_preset_starts_from_the_defaults(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  dataset: voc\n  num_classes: 21\n")
    cfg = build_config(None, None, f, default_preset=None)
    assert cfg.data.dataset == "voc" and cfg.preset == Config().preset


def test_train_cli_error_is_one_line_exit_2(tmp_path):
    f = write(tmp_path / "bad.yaml", "optim:\n  lr: fast\n")
    r = subprocess.run([sys.executable, "-m", "cps_fast.train", "--config", f],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {f}: optim.lr: 'fast' is not a valid float"


def test_the_default_demo_trains_cps_cutmix_and_paper_presets_plain_cps(tmp_path):
    # The default run trains the method that beats the supervised baseline on synthetic-v2
    # (README, "Does CPS help?"); an explicit --method or a run file's method still wins.
    assert build_config().train.method == "cps-cutmix"
    assert build_config("synthetic").train.method == "cps-cutmix"
    assert build_config("synthetic").loss.cps_weight == 1.0  # CutMix's lambda
    assert build_config("synthetic", "cps").train.method == "cps"
    assert build_config("voc_r50_1-8").train.method == "cps"
    f = tmp_path / "run.json"
    f.write_text('{"train.method": "supervised"}')
    assert build_config(None, None, str(f)).train.method == "supervised"
