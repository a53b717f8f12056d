"""Loading an ImageNet backbone from a local file: accepted layouts and the errors."""
import pytest
import torch

from cps_fast.config import ModelConfig
from cps_fast.errors import CheckpointError, ConfigError
from cps_fast.models import build_model, load_backbone
from cps_fast.models.resnet import build_backbone

# The first keys of TorchSemSeg's resnet50_v1c.pth, in its own order.
OFFICIAL_V1C_KEYS = [
    "conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv1.1.running_mean", "conv1.1.running_var",
    "conv1.3.weight", "conv1.4.weight", "conv1.4.bias", "conv1.4.running_mean", "conv1.4.running_var",
    "conv1.6.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight", "layer1.0.conv3.weight",
    "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
]


def _source(seed=7, name="tiny", **kw):
    torch.manual_seed(seed)
    bb = build_backbone(name, **kw)
    with torch.no_grad():  # non-trivial running stats, so buffers are checked too
        for m in bb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return bb


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k


def test_module_names_match_official_v1c_keys():
    keys = set(build_backbone("resnet50").state_dict())
    assert set(OFFICIAL_V1C_KEYS) <= keys


def test_round_trip_v1c_keys_with_fc_and_without_counters(tmp_path):
    src = _source()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(10, 256), torch.randn(10)
    path = tmp_path / "tiny_v1c.pth"
    torch.save(sd, path)
    dst = _source(seed=8)
    report = load_backbone(dst, str(path))
    _assert_same(src, dst)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(sd) - 2
    assert all(k.endswith("num_batches_tracked") for k in report.absent_optional)
    assert "loaded" in str(report)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
@pytest.mark.parametrize("prefix", ["module.", "module.backbone.", "backbone."])
def test_round_trip_wrapped_and_prefixed(tmp_path, wrapper, prefix):
    src = _source()
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    if "backbone." in prefix:  # a whole-model file: head keys are ignored
        sd[prefix.replace("backbone.", "head.") + "classifier.weight"] = torch.randn(3, 4, 1, 1)
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: sd, "epoch": 3}, path)
    dst = _source(seed=8)
    report = load_backbone(dst, path)
    _assert_same(src, dst)
    if "backbone." in prefix:
        assert report.ignored == ["head.classifier.weight"]  # reported without "module."


def test_half_precision_file_is_cast(tmp_path):
    src = _source()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()},
               tmp_path / "half.pth")
    dst = _source(seed=8)
    load_backbone(dst, tmp_path / "half.pth")
    assert dst.conv1[0].weight.dtype == torch.float32
    torch.testing.assert_close(dst.conv1[0].weight, src.conv1[0].weight.half().float())


def test_build_model_loads_pretrained_backbone_only(tmp_path):
    src = _source()
    torch.save(src.state_dict(), tmp_path / "bb.pth")
    cfg = ModelConfig(backbone="tiny", aspp_channels=16, decoder_channels=16, low_level_channels=8,
                      pretrained=str(tmp_path / "bb.pth"))
    torch.manual_seed(1)
    a = build_model(cfg, 4)
    torch.manual_seed(2)
    b = build_model(cfg, 4)
    _assert_same(src, a.backbone)
    _assert_same(src, b.backbone)
    assert not torch.equal(a.head.classifier.weight, b.head.classifier.weight)
    assert a.pretrained_report is not None and a.pretrained_report.ignored == []


def test_torchvision_stem_file_into_v1c_gives_clear_error(tmp_path):
    tv = _source(name="resnet50", deep_stem=False).state_dict()  # torchvision layout
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(tv, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(build_backbone("resnet50"), path)
    msg = str(err.value)
    assert str(path) in msg and "conv1.weight [64, 3, 7, 7]" in msg and "deep stem" in msg
    assert "\n" not in msg
    # the plain-stem variant takes it
    plain = build_backbone("resnet50", deep_stem=False)
    report = load_backbone(plain, path)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]


def test_v1c_file_into_plain_stem_gives_clear_error(tmp_path):
    torch.save(_source(name="resnet50").state_dict(), tmp_path / "v1c.pth")
    with pytest.raises(CheckpointError, match="deep-stem"):
        load_backbone(build_backbone("resnet50", deep_stem=False), tmp_path / "v1c.pth")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="nope.pth: no such file"):
        load_backbone(build_backbone("tiny"), path)
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_model(ModelConfig(backbone="tiny", pretrained=str(path)), 3)


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pth: unreadable"):
        load_backbone(build_backbone("tiny"), path)


def test_non_tensor_pickle_is_refused_not_executed(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"state_dict": _source().state_dict(), "cfg": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="object.pth: .*weights_only"):
        load_backbone(build_backbone("tiny"), path)


class _Opaque:
    pass


def test_missing_keys_are_listed(tmp_path):
    sd = _source().state_dict()
    for k in [k for k in sd if k.startswith("layer4.")]:
        del sd[k]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial.pth: \d+ backbone keys missing .*layer4\.0\.conv1\.weight"):
        load_backbone(build_backbone("tiny"), tmp_path / "partial.pth")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    sd = _source().state_dict()
    sd["layer2.0.conv2.weight"] = torch.randn(16, 16, 1, 1)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(build_backbone("tiny"), tmp_path / "shape.pth")
    msg = str(err.value)
    assert "shape.pth" in msg and "layer2.0.conv2.weight file [16, 16, 1, 1] vs model [16, 16, 3, 3]" in msg


def test_nonfinite_weights_rejected(tmp_path):
    sd = _source().state_dict()
    sd["bn1.weight"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite.*bn1.weight"):
        load_backbone(build_backbone("tiny"), tmp_path / "nan.pth")
