"""The whole network: shapes, config-driven widths, init, autocast, channels_last, graphs."""
import pytest
import torch
from torch import nn

from cps_fast.config import ModelConfig
from cps_fast.errors import ConfigError
from cps_fast.models import DeepLabV3Plus, aspp_rates, build_model, count_parameters

TINY = dict(backbone="tiny", aspp_channels=64, decoder_channels=64, low_level_channels=16)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def _build(cfg, num_classes=5, seed=0) -> DeepLabV3Plus:
    torch.manual_seed(seed)
    return build_model(cfg, num_classes)


@pytest.mark.parametrize("os_", [16, 8])
@pytest.mark.parametrize("hw", [(97, 83), (96, 96), (33, 47)])
def test_output_is_input_size(os_, hw):
    model = _build(tiny(output_stride=os_))
    x = torch.randn(2, 3, *hw)
    y = model(x)
    assert y.shape == (2, 5, *hw) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_r50_output_shape_65():
    model = _build(ModelConfig(backbone="resnet50"), num_classes=21).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 65, 65))
    assert y.shape == (1, 21, 65, 65)


def test_parameter_counts_at_21_classes():
    # backbone (see test_resnet) + ASPP 15,535,104 + decoder/classifier 1,309,045
    assert count_parameters(_build(ModelConfig(backbone="resnet50"), 21)) == 40_475_957
    assert count_parameters(_build(ModelConfig(backbone="resnet101"), 21)) == 59_468_085


def test_aspp_rates_and_modules():
    assert aspp_rates(16) == (6, 12, 18) and aspp_rates(8) == (12, 24, 36)
    for os_, rates in [(16, [6, 12, 18]), (8, [12, 24, 36])]:
        aspp = _build(tiny(output_stride=os_)).head.aspp
        assert [b[0].dilation[0] for b in aspp.branches[1:]] == rates
        assert [b[0].padding[0] for b in aspp.branches[1:]] == rates


def test_widths_come_from_config():
    model = _build(tiny(aspp_channels=24, decoder_channels=40, low_level_channels=12), num_classes=7)
    h = model.head
    assert all(b[0].out_channels == 24 for b in h.aspp.branches) and h.aspp.pool[0].out_channels == 24
    assert h.aspp.branches[0][0].in_channels == model.backbone.out_channels == 256
    assert h.aspp.project[0].in_channels == 24 * 5
    assert h.reduce[0].in_channels == model.backbone.low_level_channels == 32
    assert h.reduce[0].out_channels == 12
    assert h.fuse[0][0].in_channels == 24 + 12 and h.fuse[1][0].out_channels == 40
    assert h.classifier.weight.shape == (7, 40, 1, 1)
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 7, 40, 40)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="model.aspp_channels"):
        build_model(tiny(aspp_channels=0), 5)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(tiny(), 0)


def test_init_deterministic_under_seed_and_differs_across_seeds():
    a, b, c = _build(tiny(), seed=1), _build(tiny(), seed=1), _build(tiny(), seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # every conv weight differs between the two seeds (heads and, without pretrained, backbones)
    convs = [k for k, v in sa.items() if k.endswith("weight") and v.dim() == 4]
    assert convs and all(not torch.equal(sa[k], sc[k]) for k in convs)
    # the forward pass is reproducible too
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(a(x), b(x))


def test_head_init_kaiming_fan_in_and_bn():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", aspp_channels=256, decoder_channels=256,
                                    low_level_channels=48), 21)
    w = model.head.aspp.branches[1][0].weight  # 256 x 256 x 3 x 3, fan_in 2304
    assert abs(w.std().item() - (2.0 / w[0].numel()) ** 0.5) < 0.05 * (2.0 / w[0].numel()) ** 0.5
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert m.momentum == 0.1 and m.eps == 1e-5


def test_all_parameters_trainable_and_receive_gradients():
    model = _build(tiny())
    assert all(p.requires_grad for p in model.parameters())
    model(torch.randn(2, 3, 48, 48)).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_submodules_exposed():
    model = _build(tiny())
    assert isinstance(model.backbone, nn.Module) and isinstance(model.head, nn.Module)
    n = count_parameters(model)
    assert n == count_parameters(model.backbone) + count_parameters(model.head)
    assert model.output_stride == 16


def test_bf16_autocast_cpu_is_finite():
    model = _build(tiny())
    x = torch.randn(2, 3, 49, 51)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (2, 5, 49, 51)
    assert torch.isfinite(y.float()).all()
    y.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_matches_contiguous():
    ref = _build(tiny()).eval()
    cl = _build(tiny(channels_last=True)).eval()
    assert cl.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 45, 45)
    with torch.no_grad():
        y_ref = ref(x)
        y_cl = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y_ref, rtol=1e-4, atol=1e-4)


def test_batch_two_trains_and_batch_one_evaluates():
    model = _build(tiny())
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)
    # documented limit: the image-pooling BN cannot train on one image per process
    model.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 3, 32, 32))


def test_forward_traces_without_data_dependent_control_flow():
    # torch.fx symbolic tracing fails on .item()/bool(tensor) or Python branches on values;
    # passing is a cheap proxy for "no host sync, graph-capturable".
    import torch.fx
    model = _build(tiny()).eval()
    gm = torch.fx.symbolic_trace(model.head)
    low, high = model.backbone(torch.randn(2, 3, 48, 48))
    torch.testing.assert_close(gm(low, high), model.head(low, high))
    torch.fx.symbolic_trace(model.backbone)


def test_dynamo_fullgraph_no_graph_breaks():
    # fullgraph=True fails on any graph break (.item(), data-dependent shapes or branches).
    # The "eager" backend only traces (no code generation), so this stays cheap on a CPU.
    model = _build(tiny(aspp_channels=16, decoder_channels=16, low_level_channels=8), num_classes=3)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.gpu
def test_cuda_graph_capture_and_no_sync():
    dev = torch.device("cuda")
    model = _build(tiny()).to(dev).to(memory_format=torch.channels_last)
    static_x = torch.randn(4, 3, 64, 64, device=dev).contiguous(memory_format=torch.channels_last)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up on a side stream (cuDNN autotune, allocator)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(static_x).float().mean().backward()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=False)
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                static_y = model(static_x)
            static_y.float().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g.replay()
    torch.cuda.synchronize()
    assert static_y.shape == (4, 5, 64, 64) and torch.isfinite(static_y.float()).all()
