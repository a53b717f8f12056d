"""Backbone variants: torchvision's 7x7-stem ResNet and mmseg's ResNetV1c beside the v1c one.

The torchvision- and mmseg-format files are built here by hand, key by key, from those
libraries' published layouts (neither library is installed, nor needed): torchvision's
``conv1`` (7x7/2) + ``bn1`` + max-pool, then bottlenecks ``layer{i}.{j}.conv1/bn1/conv2/bn2/
conv3/bn3[/downsample.0/1]`` with the stride on ``conv2`` (v1.5), and ``fc.*``; mmseg's deep
stem as one Sequential ``stem.0`` .. ``stem.8`` (3x3/2 to 32, 3x3 to 32, 3x3 to 64, each with
BN and ReLU). A forward pass written out with ``torch.nn.functional`` from those same keys is
the reference that the loaded cps_fast backbone must reproduce.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cps_fast.config import BACKBONE_NAMES, ModelConfig
from cps_fast.errors import CheckpointError
from cps_fast.models import (BACKBONES, build_backbone, build_model, count_parameters,
                             file_layout, load_backbone, variant_for)

R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)
PLANES = (64, 128, 256, 512)


# ----------------------------------------------------------------- hand-made files
def _conv(sd, name, cout, cin, k, gen):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5


def _bn(sd, name, c, gen):
    sd[f"{name}.weight"] = 1.0 + 0.1 * torch.randn(c, generator=gen)
    sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
    sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
    sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def _stages(sd, layers, inplanes, gen):
    for i, (blocks, planes) in enumerate(zip(layers, PLANES), start=1):
        for j in range(blocks):
            p = f"layer{i}.{j}"
            _conv(sd, f"{p}.conv1", planes, inplanes, 1, gen)
            _bn(sd, f"{p}.bn1", planes, gen)
            _conv(sd, f"{p}.conv2", planes, planes, 3, gen)
            _bn(sd, f"{p}.bn2", planes, gen)
            _conv(sd, f"{p}.conv3", planes * 4, planes, 1, gen)
            _bn(sd, f"{p}.bn3", planes * 4, gen)
            if j == 0:  # every stage's first block changes width (and stride)
                _conv(sd, f"{p}.downsample.0", planes * 4, inplanes, 1, gen)
                _bn(sd, f"{p}.downsample.1", planes * 4, gen)
            inplanes = planes * 4


def torchvision_file(layers=R50, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd: dict = {}
    _conv(sd, "conv1", 64, 3, 7, gen)
    _bn(sd, "bn1", 64, gen)
    _stages(sd, layers, 64, gen)
    sd["fc.weight"] = 0.01 * torch.randn(1000, 2048, generator=gen)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def mmseg_v1c_file(layers=R50, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd: dict = {}
    _conv(sd, "stem.0", 32, 3, 3, gen)
    _bn(sd, "stem.1", 32, gen)
    _conv(sd, "stem.3", 32, 32, 3, gen)
    _bn(sd, "stem.4", 32, gen)
    _conv(sd, "stem.6", 64, 32, 3, gen)
    _bn(sd, "stem.7", 64, gen)
    _stages(sd, layers, 64, gen)
    return sd


# ----------------------------------------------------------------- reference forward
def _bn_f(sd, name, x):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, 1e-5)


def _stages_f(sd, x, layers, upto):
    for i in range(1, upto + 1):
        for j in range(layers[i - 1]):
            p = f"layer{i}.{j}"
            stride = 2 if (i > 1 and j == 0) else 1  # on the 3x3 conv2 (torchvision v1.5)
            out = F.relu(_bn_f(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"])))
            out = F.relu(_bn_f(sd, f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"],
                                                        stride=stride, padding=1)))
            out = _bn_f(sd, f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv3.weight"]))
            identity = x if j > 0 else _bn_f(sd, f"{p}.downsample.1", F.conv2d(
                x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(out + identity)
    return x


def torchvision_forward(sd, x, upto=3):
    """torchvision's ResNet forward (eval mode) from its keys, through layer ``upto``."""
    x = F.relu(_bn_f(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    return _stages_f(sd, F.max_pool2d(x, 3, 2, 1), R50, upto)


def mmseg_forward(sd, x, upto=3):
    """mmseg ResNetV1c's forward (eval mode) from its keys, through layer ``upto``."""
    x = F.relu(_bn_f(sd, "stem.1", F.conv2d(x, sd["stem.0.weight"], stride=2, padding=1)))
    x = F.relu(_bn_f(sd, "stem.4", F.conv2d(x, sd["stem.3.weight"], padding=1)))
    x = F.relu(_bn_f(sd, "stem.7", F.conv2d(x, sd["stem.6.weight"], padding=1)))
    return _stages_f(sd, F.max_pool2d(x, 3, 2, 1), R50, upto)


def ours_through_layer3(bb, x):
    x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
    return bb.layer3(bb.layer2(bb.layer1(x)))


def _save(sd, path):
    torch.save(sd, path)
    return path


# ----------------------------------------------------------------- structure
def test_variant_names_are_the_config_names():
    assert set(BACKBONES) == set(BACKBONE_NAMES)
    for name in BACKBONE_NAMES:  # every name is accepted by the config
        assert ModelConfig(backbone=name).backbone == name


def test_torchvision_variant_structure_and_parameter_count():
    bb = build_backbone("resnet50_tv")
    assert isinstance(bb.conv1, nn.Conv2d) and bb.conv1.kernel_size == (7, 7)
    assert bb.conv1.stride == (2, 2) and bb.conv1.padding == (3, 3)
    assert bb.bn1.num_features == 64 and bb.layer1[0].conv1.in_channels == 64
    assert bb.maxpool.kernel_size == 3 and bb.maxpool.stride == 2
    # the stride sits on the 3x3 (torchvision v1.5), as in v1c
    assert bb.layer2[0].conv1.stride == (1, 1) and bb.layer2[0].conv2.stride == (2, 2)
    # torchvision's resnet50 / resnet101 without fc
    assert count_parameters(bb) == 23_508_032
    assert count_parameters(build_backbone("resnet101_tv")) == 42_500_160


def test_mmseg_variant_has_the_32_wide_deep_stem():
    bb = build_backbone("resnet50_mmseg")
    assert [bb.conv1[i].out_channels for i in (0, 3, 6)] == [32, 32, 64]
    assert bb.bn1.num_features == 64 and bb.layer1[0].conv1.in_channels == 64


@pytest.mark.parametrize("os_", [16, 8])
def test_torchvision_variant_feature_shapes_and_dilations(os_):
    torch.manual_seed(0)
    bb = build_backbone("resnet50_tv", output_stride=os_).eval()
    with torch.no_grad():
        low, high = bb(torch.randn(1, 3, 65, 65))
    assert low.shape == (1, 256, 17, 17)
    assert high.shape == ((1, 2048, 5, 5) if os_ == 16 else (1, 2048, 9, 9))
    # the same dilation plan as the v1c backbone (the official multi-grid)
    with torch.device("meta"):  # structure only: no memory, no init work
        v1c = build_backbone("resnet50", output_stride=os_)
    for stage in (3, 4):
        ours = [(b.conv2.stride, b.conv2.dilation) for b in getattr(bb, f"layer{stage}")]
        ref = [(b.conv2.stride, b.conv2.dilation) for b in getattr(v1c, f"layer{stage}")]
        assert ours == ref


def test_deeplab_builds_on_the_torchvision_variant():
    """At OS8 (OS16 is the backbone test's): the head takes the variant's widths."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="resnet50_tv", output_stride=8), 5).eval()
    assert net.output_stride == 8 and net.head.aspp.branches[1][0].dilation == (12, 12)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 49, 49))
    assert out.shape == (1, 5, 49, 49) and torch.isfinite(out).all()


# ----------------------------------------------------------------- loading
def test_torchvision_file_loads_and_reproduces_torchvision_forward(tmp_path):
    sd = torchvision_file()
    path = _save(sd, tmp_path / "resnet50-0676ba61.pth")
    bb = build_backbone("resnet50_tv")
    report = load_backbone(bb, path)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(sd) - 2
    # every file tensor is in the module of the same torchvision name
    own = bb.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith("fc."))
    # and the network computes torchvision's function through layer3 (two strided stages)
    bb = bb.double().eval()
    x = torch.randn(2, 3, 45, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torchvision_forward({k: v.double() for k, v in sd.items()}, x)
    with torch.no_grad():
        got = ours_through_layer3(bb, x)
    assert got.shape == ref.shape == (2, 1024, 3, 3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_mmseg_file_loads_and_reproduces_mmseg_forward(tmp_path):
    sd = mmseg_v1c_file()
    path = _save({"state_dict": sd, "meta": {"note": "mmcv checkpoints wrap the weights"}},
                 tmp_path / "resnet50_v1c-2cccc1ad.pth")
    bb = build_backbone("resnet50_mmseg")
    report = load_backbone(bb, path)
    assert report.ignored == [] and len(report.loaded) == len(sd)
    own = bb.state_dict()
    renamed = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.",
               "stem.4.": "conv1.4.", "stem.6.": "conv1.6.", "stem.7.": "bn1."}
    for k, v in sd.items():
        ours = next((new + k[len(old):] for old, new in renamed.items() if k.startswith(old)), k)
        assert torch.equal(own[ours], v), k
    bb = bb.double().eval()
    x = torch.randn(1, 3, 41, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = mmseg_forward({k: v.double() for k, v in sd.items()}, x)
    with torch.no_grad():
        got = ours_through_layer3(bb, x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_file_layouts_name_their_variant():
    assert variant_for(file_layout(torchvision_file())) == "resnet50_tv"
    with torch.device("meta"):
        assert variant_for(file_layout(build_backbone("resnet50").state_dict())) == "resnet50"
    from cps_fast.models.pretrained import rename_mmseg_stem
    assert variant_for(file_layout(rename_mmseg_stem(mmseg_v1c_file()))) == "resnet50_mmseg"
    for name in BACKBONES:  # what each variant builds is recognised as itself
        with torch.device("meta"):
            bb = build_backbone(name)
        assert variant_for(file_layout(bb.state_dict())) == name


# ----------------------------------------------------------------- wrong variant
def _error(bb_name, path):
    with pytest.raises(CheckpointError) as err:
        load_backbone(build_backbone(bb_name), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_torchvision_file_into_v1c_names_the_torchvision_variant(tmp_path):
    path = _save(torchvision_file(), tmp_path / "resnet50-19c8e357.pth")
    msg = _error("resnet50", path)
    assert "torchvision-style ResNet-50" in msg and "conv1.weight [64, 3, 7, 7]" in msg
    assert "set model.backbone=resnet50_tv" in msg


def test_v1c_file_into_torchvision_variant_names_resnet50(tmp_path):
    torch.manual_seed(0)
    path = _save(build_backbone("resnet50").state_dict(), tmp_path / "resnet50_v1c.pth")
    msg = _error("resnet50_tv", path)
    assert "deep stem 64-64-128" in msg and "set model.backbone=resnet50" in msg


def test_mmseg_file_into_v1c_names_the_mmseg_variant(tmp_path):
    path = _save(mmseg_v1c_file(), tmp_path / "resnet50_v1c-2cccc1ad.pth")
    msg = _error("resnet50", path)
    assert "deep stem 32-32-64" in msg and "set model.backbone=resnet50_mmseg" in msg


def test_deeper_file_is_refused_not_truncated(tmp_path):
    """A ResNet-101 file holds every key of a ResNet-50 (and more): without the layout check
    it would load its first blocks and silently drop the rest."""
    with torch.device("meta"):  # the real key names and shapes; the values do not matter
        shapes = {k: (v.shape, v.dtype) for k, v in build_backbone("resnet101").state_dict().items()}
    sd = {k: torch.zeros(shape, dtype=torch.float16 if dt.is_floating_point else dt)
          for k, (shape, dt) in shapes.items()}
    path = _save(sd, tmp_path / "resnet101_v1c.pth")
    msg = _error("resnet50", path)
    assert "v1c deep-stem ResNet-101" in msg and "set model.backbone=resnet101" in msg


def test_build_model_on_each_variant_loads_its_own_file(tmp_path):
    path = _save(torchvision_file(), tmp_path / "tv.pth")
    net = build_model(ModelConfig(backbone="resnet50_tv", pretrained=str(path)), 3)
    assert net.pretrained_report is not None and len(net.pretrained_report.loaded) > 300
    with pytest.raises(CheckpointError, match="model.backbone=resnet50_tv"):
        build_model(ModelConfig(backbone="resnet50", pretrained=str(path)), 3)
