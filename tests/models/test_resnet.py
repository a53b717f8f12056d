"""Backbone structure: strides, dilations, widths and parameter counts."""
import pytest
import torch
from torch import nn

from cps_fast.errors import ConfigError
from cps_fast.models import count_parameters
from cps_fast.models.resnet import ResNet, build_backbone, dilation_plan


def _conv2_dilations(backbone: ResNet, stage: int) -> list[int]:
    return [blk.conv2.dilation[0] for blk in getattr(backbone, f"layer{stage}")]


def _conv2_strides(backbone: ResNet, stage: int) -> list[int]:
    return [blk.conv2.stride[0] for blk in getattr(backbone, f"layer{stage}")]


@pytest.mark.parametrize("os_, size", [(16, 96), (8, 96), (16, 97), (8, 83)])
def test_tiny_feature_strides(os_, size):
    torch.manual_seed(0)
    bb = build_backbone("tiny", output_stride=os_).eval()
    with torch.no_grad():
        low, high = bb(torch.randn(2, 3, size, size))
    # Each stride-2 op with padding maps n -> ceil(n / 2).
    def down(n, times):
        for _ in range(times):
            n = (n + 1) // 2
        return n
    assert low.shape == (2, bb.low_level_channels, down(size, 2), down(size, 2))
    n_high = down(size, 4 if os_ == 16 else 3)
    assert high.shape == (2, bb.out_channels, n_high, n_high)
    assert (bb.low_level_channels, bb.out_channels) == (32, 256)


def test_dilation_plan_official_multigrid():
    assert dilation_plan([3, 4, 6, 3], 16) == [
        (1, (1, 1, 1)), (2, (1, 1, 1, 1)), (2, (1,) * 6), (1, (2, 4, 8))]
    assert dilation_plan([3, 4, 23, 3], 8) == [
        (1, (1, 1, 1)), (2, (1, 1, 1, 1)), (1, (2,) * 23), (1, (4, 8, 16))]
    with pytest.raises(ConfigError):
        dilation_plan([3, 4, 6, 3], 32)


def test_r50_dilations_and_strides_in_modules():
    for os_, l3_dil, l3_stride, l4 in [(16, 1, 2, [2, 4, 8]), (8, 2, 1, [4, 8, 16])]:
        bb = build_backbone("resnet50", output_stride=os_)
        assert _conv2_dilations(bb, 4) == l4
        assert _conv2_strides(bb, 4) == [1, 1, 1]
        assert bb.layer4[0].downsample[0].stride == (1, 1)
        assert _conv2_dilations(bb, 3) == [l3_dil] * 6
        assert _conv2_strides(bb, 3)[0] == l3_stride
        assert bb.layer3[0].downsample[0].stride == (l3_stride, l3_stride)
        # padding == dilation keeps the map size in every 3x3
        for m in bb.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                assert m.padding == m.dilation


def test_r50_v1c_structure_and_forward_65():
    torch.manual_seed(0)
    bb = build_backbone("resnet50")
    stem = bb.conv1
    assert [tuple(stem[i].weight.shape) for i in (0, 3, 6)] == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert stem[0].stride == (2, 2) and bb.bn1.num_features == 128
    assert bb.layer1[0].conv1.in_channels == 128
    # v1b/v1c: the stride sits on the 3x3, not on the first 1x1
    assert bb.layer2[0].conv1.stride == (1, 1) and bb.layer2[0].conv2.stride == (2, 2)
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.momentum == 0.1 and m.eps == 1e-5
    bb.eval()
    with torch.no_grad():
        low, high = bb(torch.randn(1, 3, 65, 65))
    assert low.shape == (1, 256, 17, 17) and high.shape == (1, 2048, 5, 5)


def test_backbone_parameter_counts():
    # torchvision resnet50 minus fc = 23,508,032; the v1c deep stem adds 123,776
    # (3x3 convs 3-64-64-128 and their BNs, bn1 of 128, layer1.0's 128-wide input, minus the 7x7).
    assert count_parameters(build_backbone("resnet50")) == 23_508_032 + 123_776
    assert count_parameters(build_backbone("resnet101")) == 42_500_160 + 123_776
    # the plain (torchvision) stem variant has torchvision's exact count
    assert count_parameters(build_backbone("resnet50", deep_stem=False)) == 23_508_032


def test_bn_momentum_from_argument():
    bb = build_backbone("tiny", bn_momentum=0.01)
    assert all(m.momentum == 0.01 for m in bb.modules() if isinstance(m, nn.BatchNorm2d))


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="model.backbone"):
        build_backbone("resnet18")
